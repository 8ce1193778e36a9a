"""One unary request's cost inside the gateway, without the network (issue 8 instrument).

    .venv/bin/python -m bench.inprocess [--requests 3000] [--repeats 15] [--profile]

Starts one tritonserver (model_repository/) and records its answer to a binary 1x384
``embed`` infer. Then it runs the real app and fast lane in this process: a fake client
connection sends the request again as soon as the previous answer is written, and each
upstream connection is a fake that answers every request with the recorded reply on the
next loop iteration. No system calls, no other process on the path: what is left is the
gateway's own work per request, warm (the running gateway pays ~3x that, cache-cold).

Discovery and the metrics scrape run once, at the start, not inside the rounds. Prints
µs per request: the min and the median of ``--repeats`` rounds. On a shared VM the min
still moves by ~10%; for changes smaller than that, count instructions instead
(bench/README.md, "Where the hot path's time goes"): under callgrind, the difference
between two request counts in the main thread is the instructions per request, steady
to ~0.3% run to run (gRPC's and the log writer's threads, and hash seeds, are not)::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --separate-threads=yes \\
        --callgrind-out-file=/tmp/cg.200 .venv/bin/python -m bench.inprocess \\
        --requests 200 --repeats 1
    (again with 1200; (Ir of /tmp/cg.1200-01 - Ir of /tmp/cg.200-01) / 1000 =
    instructions per request; callgrind_annotate on each gives them per function)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from aiohttp import web

from bench.measure import binary_infer_body
from gateway.api.keys import FLEET
from gateway.app import create_app
from gateway.cli import _serve_config, build_parser
from gateway.errors import GatewayError
from gateway.fastlane import FastLane, FrontConnection
from gateway.http_upstream import HttpEndpoint
from gateway.local_triton import TritonFleet, TritonServer, find_free_port_base
from tests.e2e.conftest import MODEL_REPOSITORY

PATH = "/v2/models/embed/infer"


def infer_request() -> bytes:
    """The whole HTTP/1.1 request: a binary 1x384 FP32 ``embed`` infer."""
    tensor = np.ones((1, 384), np.float32).tobytes()
    body, headers = binary_infer_body([("INPUT", "FP32", [1, 384], tensor)], ["OUTPUT"])
    lines = [f"POST {PATH} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def record_reply(server: TritonServer, request: bytes) -> bytes:
    """Triton's whole answer to ``request``, as it sent it."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
        length = int({k.strip().lower(): v for k, v in fields.items()}[b"content-length"])
        while len(body) < length:
            body += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    return head + b"\r\n\r\n" + body


class RecordedTriton:
    """An upstream connection's transport whose every request is answered, on the next
    loop iteration, with the recorded reply."""

    def __init__(self, protocol: asyncio.Protocol, reply: bytes) -> None:
        self._protocol = protocol
        self._reply = reply

    def writelines(self, _data: Any) -> None:
        asyncio.get_running_loop().call_soon(self._protocol.data_received, self._reply)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class LoopingClient:
    """A client connection's transport: each answer written sends the request again,
    until ``left`` answers have been written."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.protocol: FrontConnection | None = None
        self.left = 0
        self.done: asyncio.Future[None] | None = None
        self.answered = b""

    def writelines(self, data: Any) -> None:
        self.answered = b"".join(data)
        self.left -= 1
        assert self.protocol is not None and self.done is not None
        if self.left > 0:
            asyncio.get_running_loop().call_soon(self.protocol.data_received, self.request)
        else:
            self.done.set_result(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError(f"the gateway closed the connection after {self.answered[:200]!r}")


async def measure(server: TritonServer, requests: int, repeats: int, profile: bool) -> list[float]:
    """µs per request of each round."""
    request = infer_request()
    reply = record_reply(server, request)

    async def answer_from_record(self: HttpEndpoint, factory: Any) -> Any:
        protocol = factory()
        protocol.connection_made(RecordedTriton(protocol, reply))
        return protocol

    # Discovery and the scrape once, at the start (their timers far beyond the rounds).
    background = ["--discovery-interval", "3600", "--scrape-interval", "3600"]
    args = build_parser().parse_args(
        ["serve", "--backend", server.backend_url, "--log-level", "WARNING", *background]
    )
    app = create_app(_serve_config(args, args.backend))
    runner = web.AppRunner(app)
    await runner.setup()  # the fleet discovers the server's models
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                app[FLEET].candidates("embed", "")
                break
            except GatewayError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        HttpEndpoint.connect = answer_from_record  # type: ignore[method-assign]
        client = LoopingClient(request)
        protocol = FastLane(app, lambda: asyncio.Protocol())()
        client.protocol = protocol
        protocol.connection_made(client)  # type: ignore[arg-type]
        rounds = []
        for round_ in range(repeats):
            client.left = requests
            client.done = asyncio.get_running_loop().create_future()
            gc.collect()
            profiler = cProfile.Profile() if profile and round_ == repeats - 1 else None
            if profiler is not None:
                profiler.enable()
            start = time.perf_counter()
            protocol.data_received(request)
            await client.done
            rounds.append((time.perf_counter() - start) / requests * 1e6)
            if profiler is not None:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        assert client.answered.startswith(b"HTTP/1.1 200"), client.answered[:200]
        return rounds
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per round")
    parser.add_argument("--repeats", type=int, default=15, help="rounds")
    parser.add_argument("--profile", action="store_true", help="cProfile the last round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshgate-inprocess-") as run_dir:
        fleet = TritonFleet(
            count=1,
            port_base=find_free_port_base(1),
            model_repository=MODEL_REPOSITORY,
            log_dir=Path(run_dir),
        )
        with fleet:
            rounds = uvloop.run(
                measure(fleet.servers[0], args.requests, args.repeats, args.profile)
            )
    print(
        f"binary 1x384 infer, in-process: {min(rounds):.1f} µs per request (min),"
        f" {statistics.median(rounds):.1f} (median of {len(rounds)} rounds"
        f" of {args.requests})"
    )


if __name__ == "__main__":
    main()
