"""`make bench`: every published number in one run, side by side, with the targets checked.

    .venv/bin/python -m bench.publish [--quick] [--no-routing]

Starts one ``tritonserver`` (model_repository/) and, in front of that same server, the
gateway (``meshgate serve``, default settings), Debian's nginx as a plain reverse proxy
and LiteLLM's proxy with its ``triton`` provider (where it is installed; see
bench/peers.py). Then, each scenario with its targets taking turns in rounds (the order
rotated every round) over the same kind of client and kept-alive connections, the
warm-up discarded:

- ``infer`` at concurrency 1: 1x384 FP32 (``embed``) and a 4 MiB BYTES element
  (``tokenize``), binary and JSON: direct vs nginx vs gateway;
- binary 1x384 ``infer`` at concurrency 32 (aiohttp): throughput;
- ``generate`` and ``/v1/chat/completions`` without streaming, and streams:
  ``generate_stream`` direct vs nginx vs gateway; ``/v1/chat/completions`` through the
  gateway and through LiteLLM vs the same work straight to Triton's ``generate_stream``;
- the fastpath microbenchmarks (compiled vs pure Python vs tritonclient/protobuf);
- the routing scenario's smoke run (``bench/routing.py``, as a subprocess).

"Added" latency is a proxy's percentile minus direct Triton's, from the same rounds.
Proxy CPU is user + system time of its process tree (/proc) over its own measured
windows, divided by requests or by streamed tokens. Writes
``bench/results/<YYYYMMDD-HHMMSS>.json`` and PNG plots beside it, and prints every
target with the measured value and the peer's.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib.metadata
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import timeit
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from adapters.prometheus import parse_samples
from bench.measure import (
    JSON_HEADERS,
    StreamSample,
    binary_infer_body,
    chat_chunk_text,
    generate_event_text,
    json_infer_body,
    percentile,
    post,
    timed_stream,
)
from bench.peers import (
    LiteLLMPeer,
    NginxPeer,
    PeerUnavailable,
    nginx_version,
    process_tree_cpu_seconds,
)
from bench.record import RESULTS, utc_stamp, write_record
from gateway.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from gateway.local_triton import TritonFleet, TritonServer, find_free_port_base
from tests.e2e.conftest import REPO, Gateway, start_gateway, stop_gateway, wait_model_ready

RUN_DIR = REPO / ".run" / "bench-publish"
LM = "tiny_lm"
CONTENT = "We hold these truths"
STREAM_TOKENS = 32  # per stream: the per-request cost is spread as a deployment's would be
GENERATE_TOKENS = 8
CONCURRENCY = 32
READY_TIMEOUT_S = 60.0
CONNECTION_TIMEOUT_S = 60.0


# ------------------------------------------------------------------ what is measured


@dataclass(frozen=True)
class Endpoint:
    """A server that requests are sent to; ``pid`` is the process tree charged for its CPU
    (None: Triton itself, the baseline)."""

    name: str
    port: int
    pid: int | None

    def cpu_seconds(self) -> float:
        return 0.0 if self.pid is None else process_tree_cpu_seconds(self.pid)


@dataclass
class Contender:
    """One target of a scenario: ``send`` does one request over the given connection and
    returns its latency (seconds) or, for a stream, its StreamSample."""

    label: str
    endpoint: Endpoint
    send: Callable[[http.client.HTTPConnection], float | StreamSample]
    samples: list[Any] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0  # of the measured windows, to take the idle background out
    error: str | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    key: str  # the JSON key and plot label
    stream: bool
    requests: int  # per target, measured
    rounds: int
    warmup: int  # per target, discarded


def unary(path: str, body: bytes, headers: dict[str, str]) -> Callable[..., float]:
    def send(conn: http.client.HTTPConnection) -> float:
        start = time.perf_counter()
        post(conn, path, body, headers)
        return time.perf_counter() - start

    return send


def streamed(
    path: str, body: dict[str, Any], carries_text: Callable[[dict[str, Any]], bool]
) -> Callable[..., StreamSample]:
    encoded = json.dumps(body).encode()

    def send(conn: http.client.HTTPConnection) -> StreamSample:
        return timed_stream(conn, path, encoded, carries_text)

    return send


def run_rounds(scenario: Scenario, contenders: list[Contender]) -> None:
    """Warm each contender up, then take turns in rounds; a contender that fails is
    recorded with its error and left out of the remaining rounds."""
    per_round = max(1, scenario.requests // scenario.rounds)
    total = len(contenders) * (scenario.warmup + per_round * scenario.rounds)
    total += len(contenders) * scenario.rounds
    connections = {
        c.label: http.client.HTTPConnection("127.0.0.1", c.endpoint.port, CONNECTION_TIMEOUT_S)
        for c in contenders
    }
    try:
        with tqdm(total=total, desc=scenario.name, unit="req", leave=True) as bar:
            for c in contenders:
                try:
                    for _ in range(scenario.warmup):
                        c.send(connections[c.label])
                        bar.update()
                except Exception as exc:  # recorded, and the others still run
                    c.error = f"{type(exc).__name__}: {exc}"[:300]
            for round_no in range(scenario.rounds):
                active = [c for c in contenders if c.error is None]
                if not active:
                    break
                shift = round_no % len(active)
                for c in active[shift:] + active[:shift]:
                    conn = connections[c.label]
                    try:
                        # A fresh connection and one discarded request per window: servers
                        # close idle keep-alive connections (uvicorn after 5 s) while the
                        # other targets take their turn.
                        conn.close()
                        c.send(conn)
                    except Exception as exc:
                        c.error = f"{type(exc).__name__}: {exc}"[:300]
                        continue
                    before, began = c.endpoint.cpu_seconds(), time.perf_counter()
                    try:
                        for _ in range(per_round):
                            c.samples.append(c.send(conn))
                            bar.update()
                    except Exception as exc:
                        c.error = f"{type(exc).__name__}: {exc}"[:300]
                    c.cpu_s += c.endpoint.cpu_seconds() - before
                    c.wall_s += time.perf_counter() - began
                    bar.update()
    finally:
        for conn in connections.values():
            conn.close()


def quantiles_us(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50) * 1e6,
        "p99": percentile(values, 99) * 1e6,
        "mean": statistics.fmean(values) * 1e6,
    }


def summarize(
    scenario: Scenario, contenders: list[Contender], idle: dict[str, float]
) -> dict[str, Any]:
    """Per contender: latency percentiles (µs), added over ``direct``, CPU per request and
    per token (also net of the proxy's idle background, ``idle`` in % of a core); or its
    error."""
    out: dict[str, Any] = {}
    for c in contenders:
        if c.error is not None or not c.samples:
            out[c.label] = {"error": c.error or "no samples"}
            continue
        row: dict[str, Any] = {"requests": len(c.samples)}
        if scenario.stream:
            row["ttft_us"] = quantiles_us([s.ttft for s in c.samples])
            row["itl_us"] = quantiles_us([g for s in c.samples for g in s.gaps])
            tokens = sum(s.pieces for s in c.samples)
            row["tokens_per_request"] = tokens / len(c.samples)
            if c.endpoint.pid is not None:
                row["cpu_us_per_token"] = c.cpu_s / tokens * 1e6
        else:
            row["latency_us"] = quantiles_us(c.samples)
        if c.endpoint.pid is not None:
            row["cpu_us_per_request"] = c.cpu_s / len(c.samples) * 1e6
            net = c.cpu_s - idle.get(c.endpoint.name, 0.0) / 100 * c.wall_s
            row["cpu_us_per_request_net_of_idle"] = net / len(c.samples) * 1e6
            if scenario.stream:
                row["cpu_us_per_token_net_of_idle"] = net / tokens * 1e6
        out[c.label] = row
    direct = out.get("direct", {})
    for metric in ("ttft_us", "itl_us", "latency_us"):
        if metric not in direct:
            continue
        for label, row in out.items():
            if label != "direct" and metric in row:
                row[f"added_{metric}"] = {
                    q: row[metric][q] - direct[metric][q] for q in ("p50", "p99")
                }
    return out


# ------------------------------------------------------------------ concurrency 32


def answer_kind(status: int, body: bytes) -> str:
    """``"200"``, or the status with the error's stable ``type`` (``"429 saturated"``)."""
    if status == 200:
        return "200"
    try:
        return f"{status} {json.loads(body).get('type', '')}".strip()
    except (ValueError, AttributeError):
        return str(status)


async def throughput_round(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], count: int
) -> tuple[float, list[float], Counter[str]]:
    """``count`` requests with CONCURRENCY in flight: (wall seconds, latencies of the
    answers 200, every answer's status)."""
    todo = iter(range(count))
    latencies: list[float] = []
    statuses: Counter[str] = Counter()

    async def worker() -> None:
        for _ in todo:
            start = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as reply:
                answer = await reply.read()
            statuses[answer_kind(reply.status, answer)] += 1
            if reply.status == 200:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - start, latencies, statuses


_BATCH_COUNTERS = ("nv_inference_count", "nv_inference_exec_count")


def embed_batching(metrics_url: str) -> tuple[float, float]:
    """Triton's counts for ``embed`` so far: (requests inferred, model executions)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        samples = parse_samples(reply.read().decode(), _BATCH_COUNTERS)
    totals = dict.fromkeys(_BATCH_COUNTERS, 0.0)
    for (name, labels), value in samples.items():
        if ("model", "embed") in labels:
            totals[name] += value
    return totals["nv_inference_count"], totals["nv_inference_exec_count"]


async def measure_throughput(
    endpoints: list[Endpoint],
    body: bytes,
    headers: dict[str, str],
    requests: int,
    rounds: int,
    triton_metrics_url: str,
) -> dict[str, Any]:
    """Binary 1x384 ``infer`` at CONCURRENCY: requests/s, latency and CPU per request, and
    the mean size of the batches Triton's dynamic batcher made of each target's traffic
    (it sets Triton's own CPU per request: see bench/README.md)."""
    per_round = requests // rounds
    results: dict[str, Any] = {}
    sessions = {
        e.name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY))
        for e in endpoints
    }
    wall = dict.fromkeys(sessions, 0.0)
    cpu = dict.fromkeys(sessions, 0.0)
    inferred = dict.fromkeys(sessions, 0.0)
    executions = dict.fromkeys(sessions, 0.0)
    latencies: dict[str, list[float]] = {name: [] for name in sessions}
    statuses: dict[str, Counter[str]] = {name: Counter() for name in sessions}
    failed: dict[str, str] = {}
    total = len(endpoints) * (per_round * rounds + CONCURRENCY * 4)
    try:
        with tqdm(total=total, desc=f"infer 1x384 binary c{CONCURRENCY}", unit="req") as bar:
            for e in endpoints:  # warm every connection of the pool
                url = f"http://127.0.0.1:{e.port}/v2/models/embed/infer"
                try:
                    await throughput_round(sessions[e.name], url, body, headers, CONCURRENCY * 4)
                except Exception as exc:
                    failed[e.name] = f"{type(exc).__name__}: {exc}"[:300]
                bar.update(CONCURRENCY * 4)
            for round_no in range(rounds):
                active = [e for e in endpoints if e.name not in failed]
                shift = round_no % max(1, len(active))
                for e in active[shift:] + active[:shift]:
                    url = f"http://127.0.0.1:{e.port}/v2/models/embed/infer"
                    before = e.cpu_seconds()
                    counts_before = embed_batching(triton_metrics_url)
                    try:
                        seconds, lat, answered = await throughput_round(
                            sessions[e.name], url, body, headers, per_round
                        )
                    except Exception as exc:
                        failed[e.name] = f"{type(exc).__name__}: {exc}"[:300]
                        continue
                    cpu[e.name] += e.cpu_seconds() - before
                    counts = embed_batching(triton_metrics_url)
                    inferred[e.name] += counts[0] - counts_before[0]
                    executions[e.name] += counts[1] - counts_before[1]
                    wall[e.name] += seconds
                    latencies[e.name] += lat
                    statuses[e.name] += answered
                    bar.update(per_round)
    finally:
        for session in sessions.values():
            await session.close()
    for e in endpoints:
        if e.name in failed or not latencies[e.name]:
            results[e.name] = {"error": failed.get(e.name, "no samples")}
            continue
        n = len(latencies[e.name])
        sent = sum(statuses[e.name].values())
        row: dict[str, Any] = {
            "requests": sent,
            "answered_200": n,
            # Refusals (429: admission) are answers, but not work done: not counted.
            "statuses": dict(sorted(statuses[e.name].items())),
            "requests_per_s": n / wall[e.name],
            "latency_us": quantiles_us(latencies[e.name]),
            "triton_mean_batch": inferred[e.name] / max(executions[e.name], 1.0),
        }
        if e.pid is not None:
            row["cpu_us_per_request"] = cpu[e.name] / sent * 1e6
        results[e.name] = row
    return results


# ------------------------------------------------------------------ microbenchmarks


def time_per_call(fns: dict[str, Callable[[], object]], repeats: int = 7) -> dict[str, Any]:
    """Seconds per call of each of ``fns``, timed in turns (``repeats`` rounds of ~0.1 s
    each) so that other work on the machine hits them alike: the minimum over the rounds
    (the least disturbed, what the ratios use) and the median."""
    timers = {name: timeit.Timer(fn) for name, fn in fns.items()}
    numbers = {name: max(1, timer.autorange()[0] // 2) for name, timer in timers.items()}
    seen: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, timer in timers.items():
            seen[name].append(timer.timeit(numbers[name]) / numbers[name])
    return {
        name: {"min": min(values), "median": statistics.median(values)}
        for name, values in seen.items()
    }


def microbenchmarks() -> dict[str, dict[str, Any]]:
    """Seconds per call (min and median) of each fastpath hot path: compiled, pure Python,
    and the peer."""
    # The pytest-benchmark suite's own inputs, so both report the same work.
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    from bench import test_bench_decisions as decisions
    from bench import test_bench_framing as framing_bench
    from fastpath import admission, framing, grpc_wire, infer_request, scoring
    from fastpath import state as S

    strings, encoded = framing_bench.STRINGS, framing_bench.ENCODED_STRINGS
    state = decisions._fleet(64)
    candidates = np.arange(64, dtype=np.int32)

    def rank(impl: Any) -> Callable[[], object]:
        scorer = impl.Scorer(impl.ScoringConfig(), state, max_ranked=decisions.RANKED)
        return lambda: scorer.rank(candidates, S.POLICY_HYBRID, decisions.NOW, 0)

    def admit_release(impl: Any) -> Callable[[], object]:
        admitter = impl.Admitter(impl.AdmissionConfig(), 4)

        def pair() -> None:
            admitter.admit(2, S.PRIORITY_STANDARD, decisions.RANKED, 0, decisions.NOW)
            admitter.release(2, decisions.NOW)

        return pair

    cases: dict[str, dict[str, Callable[[], object] | None]] = {
        "BYTES serialize, 10,000 short strings": {
            "compiled": framing.framing_c
            and (lambda: framing.framing_c.serialize_bytes_tensor(strings)),
            "pure Python": lambda: framing.framing_py.serialize_bytes_tensor(strings),
            "tritonclient": lambda: serialize_byte_tensor(framing_bench.STRINGS_ARRAY),
        },
        "BYTES deserialize, 10,000 strings": {
            "compiled": framing.framing_c
            and (lambda: framing.framing_c.deserialize_bytes_tensor(encoded)),
            "pure Python": lambda: framing.framing_py.deserialize_bytes_tensor(encoded),
            "tritonclient": lambda: deserialize_bytes_tensor(encoded),
        },
        "ModelInferRequest wire bytes, 1x384 FP32": {
            "compiled": grpc_wire.grpc_wire_c
            and (lambda: framing_bench._encode_with(grpc_wire.grpc_wire_c.encode_infer_request)),
            "pure Python": lambda: framing_bench._encode_with(
                grpc_wire.grpc_wire_py.encode_infer_request
            ),
            "protobuf": framing_bench._encode_with_protobuf,
        },
        "ModelInferResponse parse, 1x128 FP32": {
            "compiled": grpc_wire.grpc_wire_c
            and (lambda: grpc_wire.grpc_wire_c.decode_infer_response(framing_bench.RESPONSE)),
            "pure Python": lambda: grpc_wire.grpc_wire_py.decode_infer_response(
                framing_bench.RESPONSE
            ),
            "protobuf": lambda: framing_bench._decode_with_protobuf(framing_bench.RESPONSE),
        },
        "infer request check, binary 1x384 FP32": {
            "compiled": infer_request.infer_request_c
            and (lambda: framing_bench.check_infer_with(infer_request.infer_request_c)),
            "pure Python": lambda: framing_bench.check_infer_with(infer_request.infer_request_py),
        },
        "scoring (hybrid), 64 backends": {
            "compiled": scoring.scoring_c and rank(scoring.scoring_c),
            "pure Python": rank(scoring.scoring_py),
        },
        "admission, admit + release": {
            "compiled": admission.admission_c and admit_release(admission.admission_c),
            "pure Python": admit_release(admission.admission_py),
        },
    }
    results: dict[str, dict[str, Any]] = {}
    for name, impls in tqdm(cases.items(), desc="fastpath microbenchmarks", unit="case"):
        # None: the compiled module is not built, so there is nothing to time.
        results[name] = time_per_call({k: fn for k, fn in impls.items() if fn is not None})
    return results


# ------------------------------------------------------------------ routing scenario


def routing_smoke() -> dict[str, Any]:
    """bench/routing.py's smoke run in a subprocess (its output passes through); its JSON
    record and the path of its PNG."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.routing"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    written: list[str] = []
    for line in process.stdout:
        print(f"  routing | {line}", end="", flush=True)
        if found := re.match(r"wrote (\S+)$", line.strip()):
            written.append(found.group(1))
    if process.wait() != 0:
        return {"error": f"bench.routing exited with {process.returncode}"}
    records = [w for w in written if w.endswith(".json")]
    if not records:
        return {"error": "bench.routing wrote no record"}
    record = json.loads((REPO / records[0]).read_text())
    relative = [str((REPO / w).resolve().relative_to(REPO)) for w in written]
    return {
        "record": relative[written.index(records[0])],
        "png": next((p for p in relative if p.endswith(".png")), None),
        "workload": record["workload"],
        "results": record["results"],
        "targets": record["targets"],
    }


# ------------------------------------------------------------------ targets


@dataclass
class Check:
    """One target of issues 7/8: ``measured`` against ``limit`` (``<=`` unless
    ``at_least``), printed with the peer's value from the same run."""

    target: str
    measured: float | None
    limit: float | None
    unit: str
    peer: str
    peer_value: float | None
    at_least: bool = False
    note: str = ""
    peer_unit: str | None = None  # when the peer's value is not in ``unit``

    @property
    def met(self) -> bool | None:
        if self.measured is None or self.limit is None:
            return None
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def line(self) -> str:
        def fmt(v: float | None, unit: str) -> str:
            if v is None:
                return "n/a"
            return f"{v:,.1f} {unit}" if unit != "x" else f"{v:.1f}x"

        verdict = {True: "met", False: "NOT met", None: "not measured"}[self.met]
        peer = fmt(self.peer_value, self.peer_unit or self.unit)
        text = f"{self.target}: measured {fmt(self.measured, self.unit)} vs {self.peer} {peer}"
        text += f" → {verdict}"
        return text + (f" ({self.note})" if self.note else "")

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "measured": self.measured,
            "unit": self.unit,
            "limit": self.limit,
            "peer": self.peer,
            "peer_value": self.peer_value,
            "peer_unit": self.peer_unit or self.unit,
            "met": self.met,
            "note": self.note,
        }


def dig(tree: dict[str, Any], *keys: str) -> float | None:
    node: Any = tree
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node)


def why_missing(tree: dict[str, Any], label: str) -> str:
    row = tree.get(label)
    if row is None:
        return f"{label} did not run"
    return f"{label}: {row['error']}" if "error" in row else ""


def refusals(row: dict[str, Any]) -> str:
    refused = {k: v for k, v in row.get("statuses", {}).items() if k != "200"}
    return f"answers other than 200, not counted as throughput: {refused}" if refused else ""


def relative_check(
    target: str,
    scenarios: dict[str, Any],
    key: str,
    label: str,
    peer: str,
    metric: tuple[str, ...],
    factor: float,
) -> Check:
    """``label``'s metric <= ``factor`` x ``peer``'s, both from scenario ``key``."""
    tree = scenarios.get(key, {})
    measured, peer_value = dig(tree, label, *metric), dig(tree, peer, *metric)
    note = why_missing(tree, peer) or why_missing(tree, label)
    # A peer that adds nothing measurable (<= 0: noise around zero) leaves a limit of 0:
    # only a target that adds nothing measurable either is within any multiple of it.
    limit = None if peer_value is None else max(factor * peer_value, 0.0)
    if peer_value is not None and peer_value <= 0:
        note = note or f"{peer}'s value is <= 0 in this run: the limit is 0"
    return Check(target, measured, limit, "µs", peer, peer_value, note=note)


def absolute_check(
    target: str,
    scenarios: dict[str, Any],
    key: str,
    label: str,
    peer: str,
    metric: tuple[str, ...],
    limit: float,
) -> Check:
    tree = scenarios.get(key, {})
    note = why_missing(tree, label) or why_missing(tree, peer)
    return Check(
        target, dig(tree, label, *metric), limit, "µs", peer, dig(tree, peer, *metric), note=note
    )


def checks(
    scenarios: dict[str, Any], throughput: dict[str, Any], micro: dict[str, dict[str, Any]]
) -> list[Check]:
    """Every target of issues 7 and 8, measured value next to the peer's."""
    added_p50 = ("added_latency_us", "p50")
    out = [
        relative_check(
            "infer 1x384 FP32 binary c1: added p50 <= 2x nginx's",
            scenarios, "infer_small_binary", "gateway", "nginx", added_p50, 2.0,
        ),
        relative_check(
            "infer 1x384 FP32 binary c1: gateway CPU/request <= 3x nginx's",
            scenarios, "infer_small_binary", "gateway", "nginx", ("cpu_us_per_request",), 3.0,
        ),
        relative_check(
            "infer 1x384 FP32 JSON c1: added p50 <= 2x nginx's",
            scenarios, "infer_small_json", "gateway", "nginx", added_p50, 2.0,
        ),
        relative_check(
            "infer 4 MiB BYTES binary c1: added p50 <= 1.5x nginx's",
            scenarios, "infer_4mib_binary", "gateway", "nginx", added_p50, 1.5,
        ),
        relative_check(
            "infer 4 MiB BYTES JSON c1: added p50 <= 2x nginx's",
            scenarios, "infer_4mib_json", "gateway", "nginx", added_p50, 2.0,
        ),
    ]  # fmt: skip
    direct_rps = dig(throughput, "direct", "requests_per_s")
    gateway_rps = dig(throughput, "gateway", "requests_per_s")
    out.append(
        Check(
            f"infer 1x384 FP32 binary c{CONCURRENCY}: gateway throughput >= 80% of direct",
            None if gateway_rps is None else gateway_rps,
            None if direct_rps is None else 0.8 * direct_rps,
            "req/s",
            "direct Triton",
            direct_rps,
            at_least=True,
            note=why_missing(throughput, "gateway")
            or why_missing(throughput, "direct")
            or refusals(throughput.get("gateway", {})),
        )
    )
    ttft, itl = ("added_ttft_us", "p50"), ("added_itl_us", "p50")
    out += [
        relative_check(
            "chat/completions (no stream) c1: added p50 <= 0.1x LiteLLM's",
            scenarios, "generate", "gateway /v1", "litellm /v1", added_p50, 0.1,
        ),
        relative_check(
            "generate_stream c1: added TTFT p50 <= 2x nginx's",
            scenarios, "generate_stream", "gateway", "nginx", ttft, 2.0,
        ),
        relative_check(
            "generate_stream c1: added inter-token p50 <= 2x nginx's",
            scenarios, "generate_stream", "gateway", "nginx", itl, 2.0,
        ),
        absolute_check(
            "generate_stream c1: added TTFT p50 <= 1 ms",
            scenarios, "generate_stream", "gateway", "nginx", ttft, 1000.0,
        ),
        absolute_check(
            "generate_stream c1: added inter-token p50 <= 100 µs",
            scenarios, "generate_stream", "gateway", "nginx", itl, 100.0,
        ),
        absolute_check(
            "generate_stream c1: gateway CPU <= 20 µs per streamed token",
            scenarios, "generate_stream", "gateway", "nginx", ("cpu_us_per_token",), 20.0,
        ),
        relative_check(
            "chat/completions stream c1: added TTFT p50 <= 0.1x LiteLLM's",
            scenarios, "chat_stream", "gateway /v1", "litellm /v1", ttft, 0.1,
        ),
        absolute_check(
            "chat/completions stream c1: added TTFT p50 <= 1 ms",
            scenarios, "chat_stream", "gateway /v1", "litellm /v1", ttft, 1000.0,
        ),
        absolute_check(
            "chat/completions stream c1: added inter-token p50 <= 100 µs",
            scenarios, "chat_stream", "gateway /v1", "litellm /v1", itl, 100.0,
        ),
        absolute_check(
            "chat/completions stream c1: gateway CPU <= 20 µs per streamed token",
            scenarios, "chat_stream", "gateway /v1", "litellm /v1", ("cpu_us_per_token",), 20.0,
        ),
    ]  # fmt: skip
    serialize = micro.get("BYTES serialize, 10,000 short strings", {})
    speedup = None
    if "compiled" in serialize and "tritonclient" in serialize:
        speedup = serialize["tritonclient"]["min"] / serialize["compiled"]["min"]
    out.append(
        Check(
            "BYTES serialize 10,000 short strings: compiled >= 30x faster than tritonclient",
            speedup,
            30.0,
            "x",
            "tritonclient",
            dig(serialize, "tritonclient", "min") and serialize["tritonclient"]["min"] * 1e6,
            at_least=True,
            note="" if speedup is not None else "compiled framing not built",
            peer_unit="µs per call",
        )
    )
    return out


# ------------------------------------------------------------------ plots


def plot_all(
    stamp: str,
    scenarios: dict[str, Any],
    titles: dict[str, str],
    throughput: dict[str, Any],
    micro: dict[str, dict[str, Any]],
) -> list[Path]:
    """PNGs beside the JSON: added latency, streaming, CPU, fastpath. Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"nginx": "tab:green", "gateway": "tab:blue", "gateway /v1": "tab:blue"}
    colors["litellm /v1"] = "tab:red"
    written = []

    def bars(ax: Any, rows: list[tuple[str, float | None, float | None]], unit: str) -> None:
        """Per label a solid p50 bar and a hatched p99 bar."""
        for i, (label, p50, p99) in enumerate(rows):
            color = colors.get(label, "tab:gray")
            for offset, value, hatch in ((-0.2, p50, None), (0.2, p99, "//")):
                if value is not None:
                    ax.bar(i + offset, value, 0.4, color=color, hatch=hatch, alpha=0.85)
                    ax.annotate(f"{value:,.0f}", (i + offset, value), ha="center",
                                va="bottom" if value >= 0 else "top", fontsize=7)  # fmt: skip
        ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylabel(unit, fontsize=8)

    # Added latency (unary: the request; streams: time to first token) per scenario.
    latency_keys = [k for k in scenarios if k != "chat_stream" and k != "generate_stream"]
    latency_keys += ["generate_stream", "chat_stream"]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, key in zip(axes.flat, latency_keys, strict=False):
        metric = "added_ttft_us" if key.endswith("stream") else "added_latency_us"
        rows = [
            (label, dig(row, metric, "p50"), dig(row, metric, "p99"))
            for label, row in scenarios.get(key, {}).items()
            if label != "direct" and "error" not in row
        ]
        bars(ax, rows, "added µs (solid p50, hatched p99)")
        suffix = ": added TTFT" if key.endswith("stream") else ": added latency"
        ax.set_title(titles[key] + suffix, fontsize=9)
    for ax in list(axes.flat)[len(latency_keys) :]:
        ax.axis("off")
    fig.suptitle("Added latency over direct Triton, same client, interleaved rounds")
    fig.tight_layout()
    written.append(RESULTS / f"{stamp}-latency.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    # Streams: absolute TTFT and inter-token latency per target.
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    for col, key in enumerate(("generate_stream", "chat_stream")):
        for row_no, metric in enumerate(("ttft_us", "itl_us")):
            ax = axes[col * 2 + row_no]
            rows = [
                (label, dig(r, metric, "p50"), dig(r, metric, "p99"))
                for label, r in scenarios.get(key, {}).items()
                if "error" not in r
            ]
            bars(ax, rows, "µs (solid p50, hatched p99)")
            name = "time to first token" if metric == "ttft_us" else "inter-token"
            ax.set_title(f"{titles[key]}: {name}", fontsize=9)
    fig.suptitle(f"Streaming, tiny_lm at 5 ms/token, {STREAM_TOKENS} tokens per request")
    fig.tight_layout()
    written.append(RESULTS / f"{stamp}-streaming.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    # Proxy CPU per request (unary) and per streamed token (streams).
    cpu_rows: dict[str, list[tuple[str, float]]] = {}
    for key, tree in scenarios.items():
        metric = "cpu_us_per_token" if key.endswith("stream") else "cpu_us_per_request"
        cpu_rows[key] = [(label, row[metric]) for label, row in tree.items() if metric in row]
    cpu_rows[f"throughput c{CONCURRENCY}"] = [
        (label, row["cpu_us_per_request"])
        for label, row in throughput.items()
        if "cpu_us_per_request" in row
    ]
    fig, axes = plt.subplots(1, len(cpu_rows), figsize=(2.6 * len(cpu_rows), 4.5))
    for ax, (key, rows) in zip(axes, cpu_rows.items(), strict=True):
        for i, (label, value) in enumerate(rows):
            ax.bar(i, value, 0.6, color=colors.get(label, "tab:gray"))
            ax.annotate(f"{value:,.0f}", (i, value), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=7, rotation=20)
        unit = "per token" if key.endswith("stream") else "per request"
        ax.set_title(f"{titles.get(key, key)}\nCPU µs {unit}", fontsize=8)
    fig.suptitle("Proxy process-tree CPU (user + system) over the measured rounds")
    fig.tight_layout()
    written.append(RESULTS / f"{stamp}-cpu.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    # Fastpath microbenchmarks, log scale.
    fig, axes = plt.subplots(1, len(micro), figsize=(3 * len(micro), 4.5))
    impl_colors = {"compiled": "tab:blue", "pure Python": "tab:orange"}
    for ax, (name, impls) in zip(axes, micro.items(), strict=True):
        for i, (impl, timing) in enumerate(impls.items()):
            us = timing["min"] * 1e6
            ax.bar(i, us, 0.6, color=impl_colors.get(impl, "tab:gray"))
            ax.annotate(f"{us:,.2f}", (i, us), ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(impls)), list(impls), fontsize=7, rotation=20)
        ax.set_title(name, fontsize=8)
        ax.set_ylabel("µs per call (least disturbed of 7 rounds)", fontsize=8)
    fig.suptitle("fastpath: compiled vs pure-Python twin vs peer")
    fig.tight_layout()
    written.append(RESULTS / f"{stamp}-fastpath.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)
    return written


# ------------------------------------------------------------------ setup and report


def libpython_linkage() -> str:
    """Whether this interpreter runs from a shared libpython (a default source build) or
    has it linked in (distro and Docker builds): read from what the process mapped."""
    with open("/proc/self/maps") as maps:
        return "shared" if "libpython" in maps.read() else "static"


def versions(triton: TritonServer, litellm: str | None) -> dict[str, str | None]:
    def package(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    with urllib.request.urlopen(f"{triton.http_url}/v2", timeout=5) as reply:
        triton_version = json.loads(reply.read())["version"]
    found = {
        "python": platform.python_version(),
        # Which build of it: a static, PGO-built binary runs the gateway ~15% cheaper
        # than a default source build with a shared libpython (bench/README.md).
        "python_binary": os.path.realpath(sys.executable),
        "libpython": libpython_linkage(),
        "tritonserver": triton_version,
        "nginx": nginx_version(),
        "litellm": litellm,
    }
    for name in ("aiohttp", "uvloop", "Cython", "grpcio", "numpy", "tritonclient", "orjson"):
        found[name] = package(name)
    return found


def git_state() -> dict[str, Any]:
    """The commit measured and whether the tree had local changes (read-only git calls)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True, text=True
        )
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {"commit": git("rev-parse", "HEAD"), "modified_files": len(changed)}


@contextmanager
def running_targets(run_dir: Path) -> Iterator[dict[str, Any]]:
    """One Triton and, in front of it, the gateway, nginx and (if it can run) LiteLLM."""
    with ExitStack() as stack:
        fleet = stack.enter_context(
            TritonFleet(1, find_free_port_base(1), REPO / "model_repository", run_dir / "triton")
        )
        server = fleet.servers[0]
        gateway: Gateway = start_gateway([server.backend_url], run_dir / "gateway.log")
        stack.callback(stop_gateway, gateway)
        # The same gateway with aiohttp serving every request: the fast lane's own gain.
        aiohttp_front = start_gateway(
            [server.backend_url], run_dir / "gateway-aiohttp.log", "--no-fast-lane"
        )
        stack.callback(stop_gateway, aiohttp_front)
        upstream = f"127.0.0.1:{server.http_port}"
        nginx = stack.enter_context(NginxPeer([upstream], ["round_robin"], run_dir / "nginx"))
        litellm: LiteLLMPeer | None = None
        litellm_version = litellm_error = None
        try:
            litellm_version = LiteLLMPeer.version()
            litellm = stack.enter_context(LiteLLMPeer(server.http_url, LM, run_dir / "litellm"))
        except PeerUnavailable as exc:
            litellm_error = str(exc)
            print(f"LiteLLM cannot run here: {litellm_error}", flush=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for url, model in itertools.product(
            (gateway.url, aiohttp_front.url), (LM, "embed", "tokenize")
        ):
            wait_model_ready(url, model, deadline)
        yield {
            "server": server,
            "direct": Endpoint("direct", server.http_port, None),
            "nginx": Endpoint("nginx", nginx.ports["round_robin"], nginx.pid),
            "gateway": Endpoint("gateway", int(gateway.url.rsplit(":", 1)[1]), gateway.process.pid),
            "gateway_aiohttp": Endpoint(
                "gateway, aiohttp front",
                int(aiohttp_front.url.rsplit(":", 1)[1]),
                aiohttp_front.process.pid,
            ),
            "litellm": litellm and Endpoint("litellm", litellm.port, litellm.pid),
            "litellm_version": litellm_version,
            "litellm_error": litellm_error,
        }


def idle_cpu_percent(endpoints: list[Endpoint], seconds: float = 3.0) -> dict[str, float]:
    """Each proxy's CPU use with no traffic (background work: discovery, metrics scraping),
    as a percentage of one core; it is part of every measured window too."""
    before = {e.name: e.cpu_seconds() for e in endpoints}
    time.sleep(seconds)
    return {e.name: (e.cpu_seconds() - before[e.name]) / seconds * 100 for e in endpoints}


def scenario_plan(
    t: dict[str, Any], quick: bool
) -> list[tuple[Scenario, list[tuple[str, Endpoint | None, Callable[..., Any]]]]]:
    """Each scenario with its (label, endpoint, send) contenders; endpoint None: the peer
    cannot run here."""
    scale = 0.2 if quick else 1.0

    def n(count: int) -> int:
        return max(10, int(count * scale))

    rng = np.random.default_rng(0)
    small = rng.standard_normal((1, 384)).astype(np.float32)
    small_bin = binary_infer_body([("INPUT", "FP32", [1, 384], small.tobytes())], ["OUTPUT"])
    small_json = json_infer_body([("INPUT", "FP32", [1, 384], small.ravel().tolist())], ["OUTPUT"])
    element = os.urandom(4 * 2**20)
    big_bin = binary_infer_body(
        [("TEXT", "BYTES", [1], len(element).to_bytes(4, "little") + element)], ["ECHO"]
    )
    # JSON carries BYTES as a string: 4 MiB of lowercase letters, nothing to escape.
    text = (np.frombuffer(element, dtype=np.uint8) % 26 + 97).tobytes().decode()
    big_json = json_infer_body([("TEXT", "BYTES", [1], [text])], ["ECHO"])

    prompt = ChatTemplate(DEFAULT_TEMPLATE).render([{"role": "user", "content": CONTENT}])
    messages = [{"role": "user", "content": CONTENT}]

    def triton_body(tokens: int, stream: bool) -> dict[str, Any]:
        return {"text_input": prompt, "max_tokens": tokens, "stream": stream}

    def chat_body(tokens: int, stream: bool) -> dict[str, Any]:
        return {"model": LM, "messages": messages, "max_tokens": tokens, "stream": stream}

    gen_path, stream_path = f"/v2/models/{LM}/generate", f"/v2/models/{LM}/generate_stream"
    gen = unary(gen_path, json.dumps(triton_body(GENERATE_TOKENS, False)).encode(), JSON_HEADERS)
    chat = unary(
        "/v1/chat/completions", json.dumps(chat_body(GENERATE_TOKENS, False)).encode(), JSON_HEADERS
    )
    gen_stream = streamed(stream_path, triton_body(STREAM_TOKENS, True), generate_event_text)
    chat_stream = streamed("/v1/chat/completions", chat_body(STREAM_TOKENS, True), chat_chunk_text)
    proxies = [("direct", t["direct"]), ("nginx", t["nginx"]), ("gateway", t["gateway"])]

    def over_proxies(send: Callable[..., Any]) -> list[tuple[str, Endpoint | None, Any]]:
        return [(label, endpoint, send) for label, endpoint in proxies]

    def with_aiohttp_front(send: Callable[..., Any]) -> list[tuple[str, Endpoint | None, Any]]:
        return [*over_proxies(send), ("gateway, aiohttp front", t["gateway_aiohttp"], send)]

    infer = "/v2/models/embed/infer", "/v2/models/tokenize/infer"
    return [
        (Scenario("infer 1x384 FP32 binary c1", "infer_small_binary", False, n(1000), 10, 100),
         with_aiohttp_front(unary(infer[0], *small_bin))),
        (Scenario("infer 1x384 FP32 JSON c1", "infer_small_json", False, n(600), 6, 50),
         with_aiohttp_front(unary(infer[0], *small_json))),
        (Scenario("infer 4 MiB BYTES binary c1", "infer_4mib_binary", False, n(60), 6, 5),
         over_proxies(unary(infer[1], *big_bin))),
        (Scenario("infer 4 MiB BYTES JSON c1", "infer_4mib_json", False, n(30), 5, 3),
         over_proxies(unary(infer[1], *big_json))),
        (Scenario(f"generate {GENERATE_TOKENS} tokens c1", "generate", False, n(100), 5, 5),
         [*over_proxies(gen), ("gateway /v1", t["gateway"], chat),
          ("litellm /v1", t["litellm"], chat)]),
        (Scenario(f"generate_stream {STREAM_TOKENS} tokens c1", "generate_stream", True,
                  n(120), 4, 5),
         over_proxies(gen_stream)),
        (Scenario(f"chat/completions stream {STREAM_TOKENS} tokens c1", "chat_stream", True,
                  n(120), 4, 5),
         [("direct", t["direct"], gen_stream), ("gateway /v1", t["gateway"], chat_stream),
          ("litellm /v1", t["litellm"], chat_stream)]),
    ]  # fmt: skip


def print_tables(scenarios: dict[str, Any], titles: dict[str, str], tp: dict[str, Any]) -> None:
    def cell(row: dict[str, Any], *keys: str) -> str:
        value = dig(row, *keys)
        return f"{value:>10,.0f}" if value is not None else f"{'-':>10}"

    print("\nmicroseconds; added = this target's percentile minus direct Triton's, same rounds")
    head = f"{'scenario':<42}{'target':<13}{'p50':>10}{'p99':>10}{'add p50':>10}{'add p99':>10}"
    print(head + f"{'ITL p50':>10}{'add ITL':>10}{'CPU/req':>10}{'CPU/tok':>10}")
    for key, tree in scenarios.items():
        metric = "ttft_us" if key.endswith("stream") else "latency_us"
        for label, row in tree.items():
            name = titles[key] + (" TTFT" if metric == "ttft_us" else "")
            if "error" in row:
                print(f"{name:<42}{label:<13}could not run: {row['error']}")
                continue
            print(
                f"{name:<42}{label:<13}{cell(row, metric, 'p50')}{cell(row, metric, 'p99')}"
                f"{cell(row, 'added_' + metric, 'p50')}{cell(row, 'added_' + metric, 'p99')}"
                f"{cell(row, 'itl_us', 'p50')}{cell(row, 'added_itl_us', 'p50')}"
                f"{cell(row, 'cpu_us_per_request')}{cell(row, 'cpu_us_per_token')}"
            )
    for label, row in tp.items():
        name = f"infer 1x384 binary c{CONCURRENCY}"
        if "error" in row:
            print(f"{name:<42}{label:<13}could not run: {row['error']}")
            continue
        print(
            f"{name:<42}{label:<13}{cell(row, 'latency_us', 'p50')}{cell(row, 'latency_us', 'p99')}"
            f"  {row['requests_per_s']:,.0f} req/s{'':>18}{cell(row, 'cpu_us_per_request')}"
            f"   Triton's mean batch {row['triton_mean_batch']:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fifth of the requests")
    parser.add_argument("--no-routing", action="store_true", help="skip the routing scenario")
    args = parser.parse_args()

    began = time.monotonic()
    stamp = utc_stamp()
    load_before = os.getloadavg()  # other people's work on the same cores, for the record
    shutil.rmtree(RUN_DIR, ignore_errors=True)  # kept after the run: every process's log
    RUN_DIR.mkdir(parents=True)
    scenarios: dict[str, Any] = {}
    titles: dict[str, str] = {}
    workload: dict[str, Any] = {"stream_tokens": STREAM_TOKENS, "generate_tokens": GENERATE_TOKENS}
    with running_targets(RUN_DIR) as t:
        found_versions = versions(t["server"], t["litellm_version"])
        proxies = [t[name] for name in ("nginx", "gateway", "litellm") if t[name] is not None]
        idle = idle_cpu_percent(proxies)
        for scenario, plan in scenario_plan(t, args.quick):
            titles[scenario.key] = scenario.name
            workload[scenario.key] = {
                "requests_per_target": scenario.requests,
                "rounds": scenario.rounds,
                "warmup_per_target": scenario.warmup,
            }
            contenders = []
            for label, endpoint, send in plan:
                if endpoint is None:
                    contenders.append(Contender(label, Endpoint(label, 0, None), send))
                    contenders[-1].error = f"cannot run here: {t['litellm_error']}"
                else:
                    contenders.append(Contender(label, endpoint, send))
            run_rounds(scenario, [c for c in contenders if c.error is None])
            scenarios[scenario.key] = summarize(scenario, contenders, idle)
        small = np.random.default_rng(0).standard_normal((1, 384)).astype(np.float32)
        body, headers = binary_infer_body(
            [("INPUT", "FP32", [1, 384], small.tobytes())], ["OUTPUT"]
        )
        tp_requests = 600 if args.quick else 3000
        workload["throughput"] = {"concurrency": CONCURRENCY, "requests_per_target": tp_requests}
        throughput = asyncio.run(
            measure_throughput(
                [t["direct"], t["nginx"], t["gateway"]],
                body,
                headers,
                tp_requests,
                3,
                t["server"].metrics_url,
            )
        )
    micro = microbenchmarks()
    routing = {"skipped": True} if args.no_routing else routing_smoke()
    results = checks(scenarios, throughput, micro)
    plots = plot_all(stamp, scenarios, titles, throughput, micro)
    if routing.get("png"):
        plots.append(REPO / routing["png"])

    print_tables(scenarios, titles, throughput)
    print("\nmicrobenchmarks (µs per call, least disturbed of 7 interleaved rounds):")
    for name, impls in micro.items():
        cells = [f"{k} {v['min'] * 1e6:,.2f}" for k, v in impls.items()]
        print(f"  {name:<44}" + "  ".join(cells))
    for name, check in routing.get("targets", {}).items():
        print(f"routing {name}: p99 e2e ratio {check['ratio']:.2f} (<= {check['limit']}) → "
              f"{'met' if check['met'] else 'NOT met'}")  # fmt: skip
    print("idle proxy CPU, % of one core: " + ", ".join(f"{k} {v:.1f}" for k, v in idle.items()))
    print("\ntargets (issues 7 and 8), measured in this run:")
    for check in results:
        print("  " + check.line())
    if t["litellm_error"]:
        print(f"  LiteLLM could not run: {t['litellm_error']}")

    fields = {
        "versions": found_versions,
        "git": git_state(),
        "workload": workload,
        "peers": {
            "nginx": "Debian nginx-light, 1 worker, keep-alive upstream, unbuffered",
            "litellm": t["litellm_error"] or "litellm proxy, triton provider, 1 uvicorn worker",
        },
        "idle_cpu_percent_of_a_core": idle,
        "scenarios": scenarios,
        "throughput": throughput,
        "microbenchmarks_s_per_call": micro,
        "routing": routing,
        "targets": [c.as_json() for c in results],
        "plots": [str(p.relative_to(REPO)) for p in plots],
        "duration_s": time.monotonic() - began,
        "load_average_1_5_15": {"start": load_before, "end": os.getloadavg()},
    }
    write_record("publish", "", fields, stamp)
    for path in plots:
        print(f"plot {path.relative_to(REPO)}")
    print(f"bench took {(time.monotonic() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
