"""Routing on a fleet with one slow server: the gateway's policies next to nginx, in one run.

    .venv/bin/python -m bench.routing                                   # smoke, under a minute
    .venv/bin/python -m bench.routing --duration 60 --rounds 3 \\
        --policies hybrid,round_robin,least_queue,power_of_two          # the full run

Starts three tritonserver processes serving ``tiny_lm`` (two at ``--ms-per-token``, one
``--slowdown`` times slower per token), one ``meshgate serve`` per policy, and one nginx
(Debian's, installed by ``bench/peers.py`` if absent) with a ``least_conn`` and a
round-robin upstream over the servers' HTTP ports; stops them all at the end.

Load: open-loop Poisson arrivals at ``--load`` of the fleet's capacity (or ``--rate``
requests/s), the same arrival schedule for every target, each arrival a
``generate_stream`` request for ``--max-tokens`` tokens started on schedule whatever is
still in flight. Capacity is measured, not assumed: one server serves one sequence at a
time, so it is the sum over servers of 1 / (an unloaded request's duration). Targets
take turns in ``--rounds`` windows of ``duration / rounds`` seconds each, so drift on a
shared machine hits them alike.

Latencies count from each request's scheduled start (so a late client is not hidden):
TTFT to the first event carrying text, end-to-end to the end of the stream. Prints
p50/p99 per target and the issue's targets (hybrid p99 end-to-end <= 0.5x the gateway's
round_robin and <= 0.8x nginx least_conn), writes JSON and (with the ``bench`` extra's
matplotlib) a PNG of the latency distributions to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.peers import NginxPeer
from bench.record import write_record
from gateway.local_triton import TritonFleet, find_free_port_base
from tests.e2e.conftest import (
    Gateway,
    start_gateway,
    stop_gateway,
    triton_metric,
    wait_model_ready,
)
from tests.e2e.test_load_aware_routing import tiny_lm_repository
from tests.e2e.test_routing import success_counts

RUN_DIR = Path(__file__).parents[1] / ".run" / "bench-routing"
MODEL = "tiny_lm"
PROMPT = "We hold these truths"
NGINX_METHODS = ("least_conn", "round_robin")
CALIBRATION_REQUESTS = 3
REQUEST_TIMEOUT_S = 300.0  # bounds every request, even one stuck behind a runaway queue
READY_TIMEOUT_S = 60.0


@dataclass
class Target:
    """Where requests go, and what they saw there."""

    name: str
    url: str  # base URL answering /v2/models/{MODEL}/generate_stream
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    served: list[int] = field(default_factory=list)  # per Triton server


def poisson_offsets(rate: float, duration: float, rng: random.Random) -> list[float]:
    """Start times (s from the window's start) of a Poisson process at ``rate`` per s."""
    offsets: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def request_body(max_tokens: int, seed: int) -> dict[str, Any]:
    return {"text_input": PROMPT, "max_tokens": max_tokens, "stream": True, "seed": seed}


async def timed_stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], start: float
) -> tuple[float, float]:
    """(TTFT, end-to-end) in seconds from ``start`` (a perf_counter time) of one stream;
    raises RuntimeError naming the failure."""
    first = None
    async with session.post(f"{url}/v2/models/{MODEL}/generate_stream", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[len(b"data: ") :])
            if "error" in event:
                raise RuntimeError("error event")
            if first is None and event.get("text_output"):
                first = time.perf_counter()
    if first is None:
        raise RuntimeError("no text")
    return first - start, time.perf_counter() - start


async def run_window(
    session: aiohttp.ClientSession, target: Target, offsets: list[float], max_tokens: int
) -> None:
    """Start one request per offset, on schedule (open loop); wait for all of them."""

    async def one(seed: int, start: float) -> None:
        try:
            ttft, e2e = await timed_stream(
                session, target.url, request_body(max_tokens, seed), start
            )
        except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
            target.failures[str(exc) or type(exc).__name__] += 1
            return
        target.ttft.append(ttft)
        target.e2e.append(e2e)

    origin = time.perf_counter()
    tasks = []
    for seed, offset in enumerate(offsets):
        delay = origin + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(seed, origin + offset)))
    await asyncio.gather(*tasks)


async def calibrate(
    session: aiohttp.ClientSession, fleet: TritonFleet, max_tokens: int
) -> list[float]:
    """Median duration of an unloaded request on each server, straight to Triton."""
    durations = []
    for server in fleet.servers:
        samples = []
        for seed in range(CALIBRATION_REQUESTS + 1):  # the first one warms up
            _, e2e = await timed_stream(
                session, server.http_url, request_body(max_tokens, seed), time.perf_counter()
            )
            samples.append(e2e)
        durations.append(statistics.median(samples[1:]))
    return durations


async def wait_idle(fleet: TritonFleet) -> None:
    """Until no server has a queued request, so one window's backlog cannot leak into the next."""
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while any(triton_metric(s, "nv_inference_pending_request_count", MODEL) for s in fleet.servers):
        if time.monotonic() > deadline:
            raise RuntimeError("the Triton queues never drained")
        await asyncio.sleep(0.2)


async def measure(
    args: argparse.Namespace, fleet: TritonFleet, targets: list[Target]
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue in the client
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        durations = await calibrate(session, fleet, args.max_tokens)
        capacity = sum(1.0 / d for d in durations)
        rate = args.rate or args.load * capacity
        window = args.duration / args.rounds
        print(
            f"unloaded request: {', '.join(f'{d * 1e3:.0f}' for d in durations)} ms; "
            f"capacity {capacity:.2f}/s; offered {rate:.2f}/s in {args.rounds} x {window:g} s "
            f"per target",
            flush=True,
        )
        for target in targets:  # warm connections and the gateways' latency averages
            await run_window(session, target, [0.0] * len(fleet.servers), args.max_tokens)
            target.ttft.clear()
            target.e2e.clear()
            target.failures.clear()
        for target in targets:
            target.served = [0] * len(fleet.servers)
        for round_no in range(args.rounds):
            offsets = poisson_offsets(rate, window, random.Random(round_no))
            for target in targets:
                await wait_idle(fleet)
                before = success_counts(fleet, MODEL)
                await run_window(session, target, offsets, args.max_tokens)
                after = success_counts(fleet, MODEL)
                for i, (a, b) in enumerate(zip(after, before, strict=True)):
                    target.served[i] += a - b
                print(f"round {round_no + 1}/{args.rounds} {target.name}: done", flush=True)
    return {
        "unloaded_request_s": durations,
        "capacity_per_s": capacity,
        "offered_per_s": rate,
        "window_s": window,
    }


def quantiles(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        return {"p50": None, "p99": None}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p99": cuts[98]}


def summary(target: Target) -> dict[str, Any]:
    return {
        "completed": len(target.e2e),
        "failures": dict(target.failures),
        "served_per_server": target.served,
        "ttft_s": quantiles(target.ttft),
        "e2e_s": quantiles(target.e2e),
    }


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets on p99 end-to-end, where the run has the targets to compare."""

    def p99(name: str) -> float | None:
        value: float | None = results.get(name, {}).get("e2e_s", {}).get("p99")
        return value

    hybrid = p99("gateway/hybrid")
    checks = {
        "hybrid_vs_gateway_round_robin": (p99("gateway/round_robin"), 0.5),
        "hybrid_vs_nginx_least_conn": (p99("nginx/least_conn"), 0.8),
    }
    out: dict[str, Any] = {}
    for name, (peer, limit) in checks.items():
        if hybrid is None or not peer:
            continue
        ratio = hybrid / peer
        out[name] = {"ratio": ratio, "limit": limit, "met": ratio <= limit}
    return out


def print_table(results: dict[str, Any], checks: dict[str, Any]) -> None:
    header = f"{'target':<22}{'done':>6}{'fail':>6}"
    header += f"{'TTFT p50':>10}{'TTFT p99':>10}{'E2E p50':>10}{'E2E p99':>10}  served"
    print(header)
    for name, r in results.items():
        cells = [r["ttft_s"]["p50"], r["ttft_s"]["p99"], r["e2e_s"]["p50"], r["e2e_s"]["p99"]]
        latencies = "".join(f"{'-':>10}" if v is None else f"{v * 1e3:>10.0f}" for v in cells)
        failed = sum(r["failures"].values())
        print(f"{name:<22}{r['completed']:>6}{failed:>6}{latencies}  {r['served_per_server']}")
    print("(milliseconds; served = requests per server, the last one is the slow one)")
    for name, check in checks.items():
        status = "met" if check["met"] else "NOT met"
        print(f"{name}: p99 e2e ratio {check['ratio']:.2f} (target <= {check['limit']}): {status}")


def plot(targets: list[Target], checks: dict[str, Any], title: str, out: Path) -> bool:
    """CDFs of TTFT and end-to-end latency per target; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, metric in zip(axes, ("ttft", "e2e"), strict=True):
        for target in targets:
            values = sorted(getattr(target, metric))
            if values:
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, fractions, where="post", label=target.name)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap
        ax.set_xlabel(f"{'time to first token' if metric == 'ttft' else 'end-to-end'} (s)")
        ax.axhline(0.99, color="grey", linewidth=0.5, linestyle=":")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    axes[1].legend(loc="lower right", fontsize="small")
    ratios = ", ".join(f"{k} {v['ratio']:.2f}" for k, v in checks.items())
    fig.suptitle(f"{title}\np99 e2e ratios: {ratios}" if ratios else title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


@contextmanager
def gateways(fleet: TritonFleet, policies: list[str], run_dir: Path) -> Iterator[list[Gateway]]:
    """One gateway per policy, with default settings, each once it sees the model ready."""
    backends = [f"grpc://{s.grpc_url}?metrics={s.metrics_url}" for s in fleet.servers]
    started: list[Gateway] = []
    try:
        for policy in policies:
            started.append(
                start_gateway(backends, run_dir / f"gateway-{policy}.log", "--policy", policy)
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        for gateway in started:
            wait_model_ready(gateway.url, MODEL, deadline)
        yield started
    finally:
        for gateway in started:
            stop_gateway(gateway)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per target")
    parser.add_argument("--rounds", type=int, default=1, help="windows per target (default 1)")
    parser.add_argument("--load", type=float, default=0.7, help="fraction of capacity offered")
    parser.add_argument("--rate", type=float, help="requests/s offered (overrides --load)")
    parser.add_argument(
        "--policies",
        default="hybrid,round_robin,least_queue",
        help="gateway policies, comma-separated (default hybrid,round_robin,least_queue)",
    )
    parser.add_argument("--ms-per-token", type=int, default=10, help="pace of the fast servers")
    parser.add_argument("--slowdown", type=int, default=4, help="how much slower the third is")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx peers")
    args = parser.parse_args()
    if args.duration <= 0 or args.rounds < 1 or args.load <= 0:
        parser.error("--duration and --load must be > 0, --rounds >= 1")
    policies = [p for p in args.policies.split(",") if p]

    # Kept after the run: the servers', gateways' and nginx's logs are there.
    run_dir = RUN_DIR
    shutil.rmtree(run_dir, ignore_errors=True)
    with ExitStack() as stack:
        fast = tiny_lm_repository(run_dir / "fast", args.ms_per_token)
        slow = tiny_lm_repository(run_dir / "slow", args.ms_per_token * args.slowdown)
        fleet = TritonFleet(3, find_free_port_base(3), [fast, fast, slow], run_dir / "triton")
        stack.enter_context(fleet)
        started = stack.enter_context(gateways(fleet, policies, run_dir))
        targets = [Target(f"gateway/{p}", g.url) for p, g in zip(policies, started, strict=True)]
        if not args.no_nginx:
            upstreams = [f"127.0.0.1:{s.http_port}" for s in fleet.servers]
            nginx = stack.enter_context(NginxPeer(upstreams, NGINX_METHODS, run_dir / "nginx"))
            targets += [Target(f"nginx/{m}", url) for m, url in nginx.urls.items()]
        load = asyncio.run(measure(args, fleet, targets))

    results = {t.name: summary(t) for t in targets}
    checks = verdict(results)
    print_table(results, checks)
    workload = {
        k: getattr(args, k)
        for k in ("duration", "rounds", "load", "rate", "ms_per_token", "slowdown", "max_tokens")
    }
    fields = {"workload": workload | load, "results": results, "targets": checks}
    out = write_record("routing", "routing", fields)
    title = (
        f"3 Tritons ({args.ms_per_token}, {args.ms_per_token}, "
        f"{args.ms_per_token * args.slowdown} ms/token), {load['offered_per_s']:.1f} req/s "
        f"Poisson ({load['offered_per_s'] / load['capacity_per_s']:.0%} of capacity)"
    )
    png = out.with_suffix(".png")
    if plot(targets, checks, title, png):
        print(f"wrote {png}")
    else:
        print("no plot: matplotlib is missing (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
