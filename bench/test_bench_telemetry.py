"""What metrics and tracing cost per request on the ``infer`` path, measured in one run.

Two gateway processes over the session Triton fleet: ``off`` (no metrics, no tracing)
and ``on`` (metrics, tracing with the OTLP exporter sampled at 0). Each is driven by
the same keep-alive connection type; besides pytest-benchmark's latency, the gateway
process's CPU time (user + system, from /proc) per request is put in ``extra_info``
and printed. Compare the two rows; README "Observability" records a run.
"""

from __future__ import annotations

import http.client
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.test_bench_gateway import binary_infer_body, post
from gateway.local_triton import TritonFleet
from tests.e2e.conftest import Gateway, start_gateway, stop_gateway

MODES = {
    "off": ["--no-metrics", "--trace-exporter", "none"],
    # Nothing listens there: at ratio 0 nothing is exported.
    "on": ["--metrics", "--trace-exporter", "otlp", "--trace-endpoint",
           "http://127.0.0.1:9/v1/traces", "--trace-sample-ratio", "0"],
}  # fmt: skip
ROUNDS = 1500


@pytest.fixture(scope="module", params=list(MODES))
def telemetry_gateway(
    request: pytest.FixtureRequest, triton_fleet: TritonFleet, run_dir: Path
) -> Iterator[Gateway]:
    backends = [f"grpc://{s.grpc_url}?metrics={s.metrics_url}" for s in triton_fleet.servers]
    mode = request.param
    gw = start_gateway(backends, run_dir / f"telemetry-{mode}.log", *MODES[mode])
    yield gw
    stop_gateway(gw)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime, fields 14 and 15 of stat(5), counted after the ")".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.benchmark(group="telemetry: infer 1x384 FP32 binary")
def test_infer_with_and_without_telemetry(
    benchmark: Callable[..., object], telemetry_gateway: Gateway
) -> None:
    host, port = telemetry_gateway.host_port.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    tensor = np.random.default_rng(0).standard_normal((1, 384)).astype(np.float32).tobytes()
    body, headers = binary_infer_body([("INPUT", "FP32", [1, 384], tensor)], ["OUTPUT"])
    path = "/v2/models/embed/infer"
    try:
        for _ in range(50):  # warm the connection, the models and the metric children
            post(conn, path, body, headers)
        pid = telemetry_gateway.process.pid
        cpu_before = _cpu_seconds(pid)
        benchmark.pedantic(  # type: ignore[attr-defined]
            post, args=(conn, path, body, headers), rounds=ROUNDS, warmup_rounds=0
        )
        cpu_us = (_cpu_seconds(pid) - cpu_before) / ROUNDS * 1e6
    finally:
        conn.close()
    benchmark.extra_info["gateway_cpu_us_per_request"] = round(cpu_us, 1)  # type: ignore[attr-defined]
    print(f"\n{telemetry_gateway.log_path.stem}: gateway CPU {cpu_us:.1f} µs per request")
