"""Latency through the gateway vs nginx vs straight to Triton, measured in one run.

Every target fronts the same single Triton server (server 0 of the session fleet), and
all are driven by the same keep-alive ``http.client`` connection, so the difference
between rows of a group is what the proxy adds. Each proxy's CPU time per request
(user + system, from /proc, over the measured rounds) is recorded in ``extra_info``
and printed. Run with ``make bench`` or
``pytest bench/test_bench_gateway.py --benchmark-only``.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bench.measure import binary_infer_body, post
from bench.peers import NginxPeer, process_tree_cpu_seconds
from gateway.local_triton import TritonFleet
from tests.e2e.conftest import Gateway, start_gateway, stop_gateway

# binary_infer_body and post are imported from here by test_bench_telemetry.py.
__all__ = ["binary_infer_body", "post"]
TARGETS = ["direct", "nginx", "gateway"]


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    pid: int | None  # the proxy's process, whose CPU time is measured; None: direct

    def cpu_seconds(self) -> float:
        """User + system CPU of the proxy and its descendants (nginx's worker)."""
        return 0.0 if self.pid is None else process_tree_cpu_seconds(self.pid)


@pytest.fixture(scope="module")
def single_gateway(triton_fleet: TritonFleet, run_dir: Path) -> Iterator[Gateway]:
    gw = start_gateway(
        [triton_fleet.servers[0].backend_url],
        run_dir / "bench-gateway.log",
        "--max-body-bytes",
        str(64 * 2**20),
    )
    yield gw
    stop_gateway(gw)


@pytest.fixture(scope="module")
def nginx(triton_fleet: TritonFleet, run_dir: Path) -> Iterator[NginxPeer]:
    upstream = f"127.0.0.1:{triton_fleet.servers[0].http_port}"
    with NginxPeer([upstream], ["round_robin"], run_dir / "bench-nginx") as peer:
        yield peer


@pytest.fixture(params=TARGETS)
def target(
    request: pytest.FixtureRequest,
    triton_fleet: TritonFleet,
    single_gateway: Gateway,
    nginx: NginxPeer,
) -> Target:
    if request.param == "gateway":
        return Target(
            "127.0.0.1", int(single_gateway.url.rsplit(":", 1)[1]), single_gateway.process.pid
        )
    if request.param == "nginx":
        return Target("127.0.0.1", nginx.ports["round_robin"], nginx.pid)
    return Target("127.0.0.1", triton_fleet.servers[0].http_port, None)


@pytest.fixture
def connection(target: Target) -> Iterator[http.client.HTTPConnection]:
    conn = http.client.HTTPConnection(target.host, target.port, timeout=60)
    yield conn
    conn.close()


def measure(
    benchmark: Callable[..., object],
    target: Target,
    rounds: int,
    fn: Callable[..., object],
    *args: object,
) -> None:
    fn(*args)  # warm the connection and the model
    cpu_before = target.cpu_seconds()
    benchmark.pedantic(fn, args=args, rounds=rounds, warmup_rounds=0)  # type: ignore[attr-defined]
    if target.pid is not None:
        per_request = (target.cpu_seconds() - cpu_before) / rounds
        benchmark.extra_info["proxy_cpu_us_per_request"] = round(per_request * 1e6, 1)  # type: ignore[attr-defined]


@pytest.mark.benchmark(group="infer 1x384 FP32 binary")
def test_infer_small_binary(
    benchmark: Callable[..., object], target: Target, connection: http.client.HTTPConnection
) -> None:
    tensor = np.random.default_rng(0).standard_normal((1, 384)).astype(np.float32).tobytes()
    body, headers = binary_infer_body([("INPUT", "FP32", [1, 384], tensor)], ["OUTPUT"])
    measure(benchmark, target, 1000, post, connection, "/v2/models/embed/infer", body, headers)


@pytest.mark.benchmark(group="infer 4 MiB BYTES binary")
def test_infer_4mib_binary(
    benchmark: Callable[..., object], target: Target, connection: http.client.HTTPConnection
) -> None:
    element = os.urandom(4 * 2**20)
    tensor = len(element).to_bytes(4, "little") + element
    body, headers = binary_infer_body([("TEXT", "BYTES", [1], tensor)], ["ECHO"])
    measure(benchmark, target, 40, post, connection, "/v2/models/tokenize/infer", body, headers)


def first_event(target: Target) -> bytes:
    """Open a one-token generate_stream and return its first SSE event; one token keeps
    the tail of the stream (read after the event) negligible."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=30)
    try:
        body = json.dumps({"text_input": "We hold these truths", "max_tokens": 1, "stream": True})
        conn.request(
            "POST",
            "/v2/models/tiny_lm/generate_stream",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        reply = conn.getresponse()
        while True:
            line = reply.readline()
            if line.startswith(b"data: "):
                reply.read()
                return line
            if not line:
                raise AssertionError("stream ended without an event")
    finally:
        conn.close()


@pytest.mark.benchmark(group="generate_stream time to first event")
def test_generate_stream_first_event(benchmark: Callable[..., object], target: Target) -> None:
    measure(benchmark, target, 100, first_event, target)
