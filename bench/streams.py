"""Many concurrent streams through one gateway process (issue 8): do all of them
complete, how much memory does the gateway take, and does its event loop stall?

    .venv/bin/python -m bench.streams [--streams 1000] [--max-tokens 24] [--ms-per-token 20]
                                     [--pin] [--upstream grpc|http]

Starts ``--servers`` tritonserver processes on a copy of tiny_lm whose one instance
generates every sequence at once (config parameter ``concurrent_sequences``; the
shipped tiny_lm serves one at a time, so 1,000 streams would mostly wait in Triton's
queue) and one ``meshgate serve --workers 1`` (a single process) whose admission lets
every stream in. After a warm-up it opens all ``--streams`` streams at once, alternating
``/v2 generate_stream`` and ``/v1/chat/completions``, and checks that each ends
properly with ``--max-tokens`` tokens.

Measured: wall time from the first request to the last stream's end; the machine's
load average before and after; the gateway's peak RSS (the larger of VmHWM, the
kernel's high-water mark, which it updates lazily, and VmRSS sampled every 0.1 s,
both from /proc/PID/status); its event-loop lag from its own /metrics, polled every
second: the max is the largest ``meshgate_event_loop_lag_max_seconds`` (each scrape
reads the max since the previous one), the p99 is the upper bound of the
``meshgate_event_loop_lag_seconds`` bucket holding the 99th percentile of the run's
readings. Lag is wall time, so a loop thread that waits for a CPU (2 cores shared with
Triton, the client and whatever else runs) shows as lag too: the loop thread's CPU time
and run-queue wait over the run (/proc/PID/schedstat) tell the two apart, and the run's
garbage collections on the loop (``meshgate_gc_pause_seconds``: how many per
generation, the bucket of the longest, and their total time, which for the run's one
full collection is its exact length) tell a collection from other work. Prints a
table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.peers import process_tree
from bench.record import write_record
from gateway.local_triton import TritonFleet, find_free_port_base
from tests.e2e.conftest import (
    Gateway,
    admin_fleet,
    admit_everything,
    start_gateway,
    stop_gateway,
    tiny_lm_stream,
    tiny_lm_variant,
    total_inflight,
    wait_model_ready,
)

ADMIN_TOKEN = "bench-streams-admin-token"
LAG = "meshgate_event_loop_lag_seconds"
LAG_MAX = "meshgate_event_loop_lag_max_seconds"
GC_PAUSE = "meshgate_gc_pause_seconds"
WARM_UP_STREAMS = 16
RSS_EVERY_S = 0.1
METRICS_EVERY_S = 1.0
REQUEST_TIMEOUT_S = 120.0


def proc_status_bytes(pid: int, field_name: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith(field_name + ":"))
    return int(line.split()[1]) * 1024


def pin(processes: list[int], cpus: set[int]) -> None:
    """Every thread of ``processes`` onto ``cpus`` (affinity is per thread)."""
    for process in processes:
        with contextlib.suppress(OSError):
            for thread in os.listdir(f"/proc/{process}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(thread), cpus)


def loop_thread_times(pid: int) -> tuple[float, float]:
    """Seconds the process's main thread (the event loop) ran on a CPU and waited for
    one while runnable, from /proc/PID/schedstat."""
    with open(f"/proc/{pid}/schedstat") as schedstat:
        on_cpu_ns, waiting_ns, _ = schedstat.read().split()
    return int(on_cpu_ns) / 1e9, int(waiting_ns) / 1e9


@dataclass
class LagReadings:
    """What the gateway's /metrics said about its loop lag, scrape after scrape."""

    maxima: list[float] = field(default_factory=list)
    # (histogram, generation label or "") -> {le: cumulative count}, at the first and
    # at the last scrape: the loop lag, and each generation's garbage collections.
    first_buckets: dict[tuple[str, str], dict[float, float]] = field(default_factory=dict)
    last_buckets: dict[tuple[str, str], dict[float, float]] = field(default_factory=dict)
    # Seconds spent collecting, per generation: with one collection, its exact length.
    first_gc_seconds: dict[str, float] = field(default_factory=dict)
    last_gc_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, metrics_text: str) -> None:
        buckets: dict[tuple[str, str], dict[float, float]] = collections.defaultdict(dict)
        gc_seconds = {}
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                if sample.name == LAG_MAX:
                    self.maxima.append(sample.value)
                elif sample.name in (LAG + "_bucket", GC_PAUSE + "_bucket"):
                    key = (sample.name, sample.labels.get("generation", ""))
                    buckets[key][float(sample.labels["le"])] = sample.value
                elif sample.name == GC_PAUSE + "_sum":
                    gc_seconds[sample.labels["generation"]] = sample.value
        if not self.first_buckets:
            self.first_buckets = buckets
            self.first_gc_seconds = gc_seconds
        self.last_buckets = buckets
        self.last_gc_seconds = gc_seconds

    def counts(self, histogram: str, generation: str = "") -> dict[float, float]:
        """Per bucket (cumulative), what the run added between the first and last scrape."""
        key = (histogram + "_bucket", generation)
        first = self.first_buckets.get(key, {})
        return {le: n - first.get(le, 0.0) for le, n in self.last_buckets.get(key, {}).items()}

    def summary(self) -> dict[str, Any]:
        """Max and p99 over the readings after the first scrape (which only resets), and
        the run's garbage collections per generation: how many, the bucket bound of the
        longest (what the max lag may have been), and their total seconds."""
        counts = self.counts(LAG)
        readings = counts.get(float("inf"), 0.0)
        gc_pauses = {}
        for generation in ("0", "1", "2"):
            pauses = self.counts(GC_PAUSE, generation)
            spent = self.last_gc_seconds.get(generation, 0.0)
            gc_pauses[generation] = {
                "count": int(pauses.get(float("inf"), 0.0)),
                "longest_bucket_s": bucket_holding(pauses, 1.0),
                "total_s": round(spent - self.first_gc_seconds.get(generation, 0.0), 4),
            }
        return {
            "readings": int(readings),
            "max_s": max(self.maxima[1:], default=None),
            "p99_bucket_s": bucket_holding(counts, 0.99),
            "over_50ms": int(readings - counts.get(0.05, 0.0)),
            "gc_pauses": gc_pauses,
        }


def bucket_holding(counts: dict[float, float], fraction: float) -> float | None:
    """The upper bound of the first bucket whose cumulative count holds ``fraction`` of
    all the readings (None without buckets)."""
    total = counts.get(float("inf"), 0.0)
    return next((le for le, n in sorted(counts.items()) if n >= fraction * total), None)


async def poll_metrics(session: aiohttp.ClientSession, url: str, lag: LagReadings) -> None:
    async with session.get(url + "/metrics") as reply:
        lag.add(await reply.text())


async def run(args: argparse.Namespace, gateway: Gateway) -> dict[str, Any]:
    pid = gateway.process.pid
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[str] = []  # the first few, for the record
    lag = LagReadings()
    rss_samples: list[int] = []

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        try:
            tokens = await tiny_lm_stream(
                session, gateway.url, args.max_tokens, openai=index % 2 == 0
            )
            outcome = "ok" if tokens == args.max_tokens else "wrong_token_count"
        except (AssertionError, aiohttp.ClientError, TimeoutError) as exc:
            outcome = "error"
            if len(failures) < 10:
                failures.append(f"{type(exc).__name__}: {exc}")
        outcomes[outcome] += 1

    async def sample_rss(done: asyncio.Event) -> None:
        while not done.is_set():
            rss_samples.append(proc_status_bytes(pid, "VmRSS"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), RSS_EVERY_S)

    async def sample_metrics(session: aiohttp.ClientSession, done: asyncio.Event) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), METRICS_EVERY_S)
            await poll_metrics(session, gateway.url, lag)

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=args.streams + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(session, i) for i in range(WARM_UP_STREAMS)))
        warm = dict(outcomes)
        outcomes.clear()
        rss_before = proc_status_bytes(pid, "VmRSS")
        await poll_metrics(session, gateway.url, lag)  # resets the max since the last scrape
        done = asyncio.Event()
        samplers = [
            asyncio.create_task(sample_rss(done)),
            asyncio.create_task(sample_metrics(session, done)),
        ]
        load_before = os.getloadavg()[0]
        started = time.monotonic()
        cpu_before, waited_before = loop_thread_times(pid)
        await asyncio.gather(*(one(session, i) for i in range(args.streams)))
        wall_s = time.monotonic() - started
        cpu_after, waited_after = loop_thread_times(pid)
        done.set()
        await asyncio.gather(*samplers)
    await asyncio.sleep(0.5)  # the gateway releases a lease just after the stream's last byte
    view = await admin_fleet(gateway, ADMIN_TOKEN)
    return {
        "warm_up": warm,
        "outcomes": dict(outcomes),
        "failures": failures,
        "wall_s": round(wall_s, 2),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "loop_thread_cpu_s": round(cpu_after - cpu_before, 2),
        "loop_thread_runqueue_wait_s": round(waited_after - waited_before, 2),
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_peak_mib": round(max(*rss_samples, proc_status_bytes(pid, "VmHWM")) / 2**20, 1),
        "rss_after_mib": round(proc_status_bytes(pid, "VmRSS") / 2**20, 1),
        "loop_lag": lag.summary(),
        "inflight_after": total_inflight(view),
    }


@contextlib.contextmanager
def fleet_and_gateway(args: argparse.Namespace, run_dir: Path) -> Iterator[Gateway]:
    """The Tritons and the gateway of the scenario, stopped on the way out."""
    repository = tiny_lm_variant(
        run_dir / "repository",
        ms_per_token=str(args.ms_per_token),
        concurrent_sequences=str(args.streams + WARM_UP_STREAMS),
    )
    config = admit_everything(run_dir / "streams.toml", args.streams)
    fleet = TritonFleet(args.servers, find_free_port_base(args.servers), repository, run_dir)
    with fleet:
        # gRPC only, or each backend as `make run` names it (gRPC, metrics and HTTP: the
        # streams then go over Triton's HTTP generate_stream, relayed from callbacks).
        backends = [
            s.backend_url if args.upstream == "http" else f"grpc://{s.grpc_url}"
            for s in fleet.servers
        ]
        flags = ("--workers", "1", "--config", str(config), "--admin-token", ADMIN_TOKEN)
        gateway = start_gateway(backends, run_dir / "gateway.log", *flags)
        try:
            wait_model_ready(gateway.url, "tiny_lm", time.monotonic() + 60)
            if args.pin:
                # The gateway alone on the last CPU; Triton (with its backend stubs) and
                # this client (not its children: the gateway and Triton) on the rest.
                cpus = sorted(os.sched_getaffinity(0))
                pin([os.getpid()], set(cpus[:-1]))
                for server in fleet.servers:
                    pin(process_tree(server.pid), set(cpus[:-1]))
                pin(process_tree(gateway.process.pid), {cpus[-1]})
            yield gateway
        finally:
            stop_gateway(gateway)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=24, help="per stream (default 24)")
    parser.add_argument("--ms-per-token", type=int, default=20, help="tiny_lm pace (default 20)")
    parser.add_argument("--servers", type=int, default=2, help="tritonservers (default 2)")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the gateway alone on the last CPU, Triton and the client on the others: its "
        "loop lag is then its own, not time spent waiting for a CPU (needs 2+ CPUs)",
    )
    parser.add_argument(
        "--upstream",
        choices=("grpc", "http"),
        default="grpc",
        help="grpc (default): gRPC-only backends; http: backends with their HTTP endpoint, "
        "as `make run` starts them (streams over Triton's HTTP generate_stream)",
    )
    args = parser.parse_args()

    run_dir = Path(".run/bench-streams")
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the repository copy is made afresh
    run_dir.mkdir(parents=True)
    with fleet_and_gateway(args, run_dir) as gateway:
        results = asyncio.run(run(args, gateway))

    for name, value in results.items():
        print(f"{name:22} {value}")
    names = ("streams", "max_tokens", "ms_per_token", "servers", "pin", "upstream")
    workload = {name: getattr(args, name) for name in names}
    name = f"streams-s{args.streams}-{args.upstream}" + ("-pinned" if args.pin else "")
    write_record("streams", name, {"workload": workload, **results})


if __name__ == "__main__":
    main()
