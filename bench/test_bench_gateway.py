"""Latency through the gateway vs straight to Triton, measured in the same run.

Both targets are driven by the same keep-alive ``http.client`` connection type, so the
difference between a pair of rows is what the gateway adds. Run with
``make bench`` or ``pytest bench/test_bench_gateway.py --benchmark-only``; compare the
``gateway`` and ``direct`` rows of each group (pytest-benchmark prints them together).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from gateway.local_triton import TritonFleet
from tests.e2e.conftest import Gateway

TARGETS = ["direct", "gateway"]


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest, gateway: Gateway, triton_fleet: TritonFleet) -> str:
    if request.param == "gateway":
        return gateway.host_port
    return f"127.0.0.1:{triton_fleet.servers[0].http_port}"


@pytest.fixture
def connection(target: str) -> Iterator[http.client.HTTPConnection]:
    host, port = target.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    yield conn
    conn.close()


def _binary_infer_body() -> tuple[bytes, dict[str, str]]:
    tensor = np.random.default_rng(0).standard_normal((1, 384)).astype(np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT",
                    "datatype": "FP32",
                    "shape": [1, 384],
                    "parameters": {"binary_data_size": len(tensor)},
                }
            ],
            "outputs": [{"name": "OUTPUT", "parameters": {"binary_data": True}}],
        }
    ).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return header + tensor, headers


def _post(
    conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]
) -> bytes:
    conn.request("POST", path, body=body, headers=headers)
    reply = conn.getresponse()
    data = reply.read()
    if reply.status != 200:
        raise AssertionError(f"{reply.status}: {data[:200]!r}")
    return data


@pytest.mark.benchmark(group="infer 1x384 FP32 binary")
def test_infer_small_binary(
    benchmark: Callable[..., object], connection: http.client.HTTPConnection
) -> None:
    body, headers = _binary_infer_body()
    _post(connection, "/v2/models/embed/infer", body, headers)  # warm the connection
    benchmark.pedantic(  # type: ignore[attr-defined]
        _post,
        args=(connection, "/v2/models/embed/infer", body, headers),
        rounds=300,
        warmup_rounds=20,
    )


def _first_event(target: str) -> bytes:
    """Open a generate_stream of one token and return its first SSE event; one token
    keeps the tail of the stream (read after the event) negligible."""
    host, port = target.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
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
def test_generate_stream_first_event(benchmark: Callable[..., object], target: str) -> None:
    benchmark.pedantic(_first_event, args=(target,), rounds=60, warmup_rounds=5)  # type: ignore[attr-defined]
