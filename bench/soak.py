"""Soak: N concurrent streams churning through one gateway process for T minutes.

    .venv/bin/python -m bench.soak [--streams 500] [--minutes 5]
    .venv/bin/python -m bench.soak --gateway http://H:P --gateway-pid PID

Without --gateway it starts its own fleet (``--servers`` tritonserver processes on
model_repository/) and a ``meshgate serve`` whose admission limits admit every stream,
and stops both at the end. Each stream is a loop of tiny_lm streams, alternating
``/v2 generate_stream`` and ``/v1/chat/completions``; one request in ten hangs up
after its first event, so cancellation is churned too. The gateway's RSS and open
file descriptors are read from /proc: before the load, after a warm-up (the first
tenth of the run, when pools and caches fill) and at the end. Growth is measured
from the warm-up sample. Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.peers import local_fleet_and_gateway
from bench.record import write_record
from gateway.local_triton import TritonFleet
from tests.e2e.conftest import Gateway, stop_gateway

HANG_UP_EVERY = 10
REQUEST_TIMEOUT_S = 120.0  # streams queue in Triton behind each other: be generous


@dataclass(frozen=True)
class ProcessSample:
    at_s: float
    rss_bytes: int
    open_fds: int


def sample_process(pid: int, started: float) -> ProcessSample:
    with open(f"/proc/{pid}/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return ProcessSample(
        round(time.monotonic() - started, 1), rss_kib * 1024, len(os.listdir(f"/proc/{pid}/fd"))
    )


async def one_request(session: aiohttp.ClientSession, url: str, index: int, max_tokens: int) -> str:
    """One stream; returns its outcome: ok, hung_up, rejected (429) or error."""
    body: dict[str, Any] = {"max_tokens": max_tokens, "stream": True}
    if index % 2:
        path = "/v2/models/tiny_lm/generate_stream"
        body["text_input"] = "We hold"
    else:
        path = "/v1/chat/completions"
        body |= {"model": "tiny_lm", "messages": [{"role": "user", "content": "We hold"}]}
    async with session.post(url + path, json=body) as r:
        if r.status == 429:
            await r.read()
            return "rejected"
        if r.status != 200:
            await r.read()
            return "error"
        async for line in r.content:
            if index % HANG_UP_EVERY == 0:
                r.close()  # a client that goes away mid-stream
                return "hung_up"
            if line.startswith((b"event: error", b'data: {"error"')):
                return "error"
    return "ok"


async def churn(args: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    started = time.monotonic()
    end = started + args.minutes * 60
    samples = [sample_process(pid, started)]
    warm: list[ProcessSample] = []  # the first sample after the warm-up
    outcomes: collections.Counter[str] = collections.Counter()
    counter = iter(range(10**12))  # request indexes, shared by every stream loop

    async def stream_loop(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            index = next(counter)
            try:
                outcome = await one_request(session, url, index, args.max_tokens)
            except (aiohttp.ClientError, TimeoutError):
                outcome = "error"
            outcomes[outcome] += 1

    async def sampler() -> None:
        warm_up = started + args.minutes * 60 / 10
        while time.monotonic() < end:
            await asyncio.sleep(min(5.0, max(0.1, end - time.monotonic())))
            samples.append(sample_process(pid, started))
            if not warm and time.monotonic() >= warm_up:
                warm.append(samples[-1])

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=args.streams)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(sampler(), *(stream_loop(session) for _ in range(args.streams)))
    await asyncio.sleep(1.0)  # let the gateway close what the last requests left
    samples.append(sample_process(pid, started))
    return {
        "outcomes": dict(outcomes),
        "start": asdict(samples[0]),
        "warm": asdict(warm[0] if warm else samples[-1]),
        "end": asdict(samples[-1]),
        "samples": [asdict(s) for s in samples],
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    start, warm, end = results["start"], results["warm"], results["end"]
    outcomes = results["outcomes"]
    return {
        "served": outcomes.get("ok", 0) + outcomes.get("hung_up", 0),
        "errors": outcomes.get("error", 0),
        "rejected_429": outcomes.get("rejected", 0),
        "rss_start_mib": start["rss_bytes"] / 2**20,
        "rss_warm_mib": warm["rss_bytes"] / 2**20,
        "rss_end_mib": end["rss_bytes"] / 2**20,
        "rss_growth_after_warm_up_pct": 100 * (end["rss_bytes"] / warm["rss_bytes"] - 1),
        "fds_start": start["open_fds"],
        "fds_warm": warm["open_fds"],
        "fds_end": end["open_fds"],
    }


def print_table(summary: dict[str, Any]) -> None:
    for name, value in summary.items():
        print(f"{name:30} {value:12.1f}" if isinstance(value, float) else f"{name:30} {value:12}")


def own_setup(args: argparse.Namespace, run_dir: Path) -> tuple[TritonFleet, Gateway]:
    # Admit every stream and let Triton queue them: the soak measures the gateway
    # holding them, not shedding them (neither admission limits nor queue saturation).
    config = run_dir / "soak.toml"
    limit = args.streams + 16
    config.write_text(
        "[admission]\n"
        f"max_inflight = {limit}\nmax_inflight_hard = {limit}\n"
        f"model_max_inflight = {limit}\nmodel_max_inflight_hard = {limit}\n"
        f"[scoring]\nqueue_saturation = {limit}\n"
    )
    return local_fleet_and_gateway(args.servers, run_dir, "tiny_lm", "--config", str(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", help="gateway base URL (default: start one)")
    parser.add_argument("--gateway-pid", type=int, help="its process id (with --gateway)")
    parser.add_argument("--servers", type=int, default=2, help="servers to start (default 2)")
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=8, help="per stream (default 8)")
    args = parser.parse_args()
    if (args.gateway is None) != (args.gateway_pid is None):
        parser.error("give both --gateway and --gateway-pid, or neither")

    run_dir = Path(".run/bench-soak")
    run_dir.mkdir(parents=True, exist_ok=True)
    fleet = gateway = None
    if args.gateway is None:
        fleet, gateway = own_setup(args, run_dir)
        args.gateway, args.gateway_pid = gateway.url, gateway.process.pid
    try:
        results = asyncio.run(churn(args, args.gateway, args.gateway_pid))
    finally:
        if gateway is not None:
            stop_gateway(gateway)
        if fleet is not None:
            fleet.stop()

    summary = summarize(results)
    print_table(summary)
    workload = {k: getattr(args, k) for k in ("streams", "minutes", "max_tokens", "servers")}
    fields = {"workload": workload, "summary": summary, "results": results}
    write_record("soak", f"soak-s{args.streams}", fields)


if __name__ == "__main__":
    main()
