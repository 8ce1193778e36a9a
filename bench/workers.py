"""Throughput of ``meshgate serve --workers 1`` vs ``--workers 2`` under a load that
saturates one worker, reported as a ratio.

    .venv/bin/python -m bench.workers [--load binary|json] [--connections 64] [--seconds 10]

Starts 2 tritonserver processes on model_repository/, then, in interleaved rounds, a
gateway with 1 and with 2 workers in front of them. The load is ``--connections``
kept-alive connections, each sending small ``embed`` infers (1x384 FP32, binary or JSON)
back to back from a raw-protocol client (a few µs per request, so the client is not what
limits). Requests completed in the measured window give requests/s; the CPU seconds of
the gateway (supervisor and workers), of the Tritons and of this client over the window
say where the machine's cores went. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import uvloop

from bench.measure import binary_infer_body, json_infer_body
from bench.peers import process_tree_cpu_seconds
from bench.record import write_record
from gateway.local_triton import TritonFleet, find_free_port_base
from tests.e2e.conftest import (
    MODEL_REPOSITORY,
    Gateway,
    admit_everything,
    start_gateway,
    stop_gateway,
    wait_for_workers,
)

ADMIN_TOKEN = "bench-workers"
WARM_UP_S = 2.0


def infer_request(host_port: str, load: str) -> bytes:
    """One HTTP/1.1 request, as bytes: an infer of embed's 1x384 FP32 input, ``binary``
    (forwarded untouched) or ``json`` (the gateway parses it and builds the gRPC call,
    so more of the work per request is the gateway's)."""
    values = [i / 384 for i in range(384)]
    if load == "binary":
        tensor = struct.pack("<384f", *values)
        body, headers = binary_infer_body([("INPUT", "FP32", [1, 384], tensor)], ["OUTPUT"])
    else:
        body, headers = json_infer_body([("INPUT", "FP32", [1, 384], values)], ["OUTPUT"])
    head = f"POST /v2/models/embed/infer HTTP/1.1\r\nHost: {host_port}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class LoadConnection(asyncio.Protocol):
    """Sends the request again as soon as each answer is complete; counts answers by
    status. Answers must carry Content-Length (the gateway's infer answers do)."""

    def __init__(self, request: bytes, counts: dict[int, int]) -> None:
        self._request = request
        self._counts = counts
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self._buffer[:end]).lower()
            # At a line start: inference-header-content-length ends the same way.
            start = head.find(b"\r\ncontent-length:") + len(b"\r\ncontent-length:")
            line_end = head.find(b"\r\n", start)
            length = int(head[start : line_end if line_end >= 0 else len(head)])
            if len(self._buffer) < end + 4 + length:
                return
            status = int(head[9:12])
            self._counts[status] = self._counts.get(status, 0) + 1
            del self._buffer[: end + 4 + length]
            assert self._transport is not None
            self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def measure(
    gateway: Gateway, tritons: list[int], load: str, connections: int, seconds: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host, port = gateway.host_port.split(":")
    request = infer_request(gateway.host_port, load)
    counts: dict[int, int] = {}
    opened = [
        await loop.create_connection(lambda: LoadConnection(request, counts), host, int(port))
        for _ in range(connections)
    ]
    await asyncio.sleep(WARM_UP_S)
    before = dict(counts), _cpu(gateway, tritons), time.perf_counter()
    await asyncio.sleep(seconds)
    after = dict(counts), _cpu(gateway, tritons), time.perf_counter()
    for transport, protocol in opened:
        transport.close()
        await protocol.closed
    elapsed = after[2] - before[2]
    answers = {s: n - before[0].get(s, 0) for s, n in after[0].items()}
    cpu = {k: round((after[1][k] - before[1][k]) / elapsed, 2) for k in after[1]}
    return {
        "requests_per_s": round(answers.get(200, 0) / elapsed, 1),
        "answers_by_status": answers,
        "cores_busy": cpu,  # CPU seconds per second of the window, by process group
    }


def _cpu(gateway: Gateway, tritons: list[int]) -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "gateway": process_tree_cpu_seconds(gateway.process.pid),
        "tritons": sum(process_tree_cpu_seconds(pid) for pid in tritons),
        "client": usage.ru_utime + usage.ru_stime,
    }


def run(load: str, connections: int, seconds: float, rounds: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    config = admit_everything(work / "admit.toml", connections)
    fleet = TritonFleet(2, find_free_port_base(2), MODEL_REPOSITORY, work / "triton")
    results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with fleet:
        backends = [s.backend_url for s in fleet.servers]
        tritons = [s.pid for s in fleet.servers]
        for round_index in range(rounds):
            for workers in (1, 2):
                gateway = start_gateway(
                    backends,
                    work / f"gateway-w{workers}-r{round_index}.log",
                    "--workers",
                    str(workers),
                    "--config",
                    str(config),
                    "--admin-token",
                    ADMIN_TOKEN,
                    "--log-level",
                    "WARNING",
                )
                try:
                    wait_for_workers(gateway, workers, "embed", ADMIN_TOKEN)
                    sample = uvloop.run(measure(gateway, tritons, load, connections, seconds))
                finally:
                    stop_gateway(gateway)
                results[workers].append(sample)
                print(f"round {round_index} workers={workers}: {sample}", flush=True)
    ratios = [
        two["requests_per_s"] / one["requests_per_s"]
        for one, two in zip(results[1], results[2], strict=True)
    ]
    return {
        "load": load,
        "connections": connections,
        "window_s": seconds,
        "rounds": {f"workers_{w}": samples for w, samples in results.items()},
        "ratio_2_over_1": [round(r, 3) for r in ratios],
        "ratio_2_over_1_median": round(statistics.median(ratios), 3),
        "cores": len(os.sched_getaffinity(0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", choices=("binary", "json"), default="binary")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    fields = run(args.load, args.connections, args.seconds, args.rounds)
    print(f"requests/s ratio, --workers 2 over --workers 1: {fields['ratio_2_over_1']}")
    write_record("workers", f"workers-{args.load}", fields)


if __name__ == "__main__":
    main()
