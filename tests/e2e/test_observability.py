"""Metrics, traces and request logs of a gateway in front of a tracing Triton.

One Triton server runs with OpenTelemetry tracing (every request, exported as OTLP/JSON)
to a small OTLP/HTTP receiver in this process; the gateway exports its spans (OTLP
protobuf, sampled at 0 so only a caller's sampled traceparent records) to the same
receiver. Admission refuses sheddable requests (sheddable_fraction = 0) for a 429.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from gateway.local_triton import TritonFleet, find_free_port_base
from tests.e2e.conftest import (
    MODEL_REPOSITORY,
    Gateway,
    http_status,
    start_gateway,
    stop_gateway,
)

pytestmark = pytest.mark.e2e

SPAN_WAIT_S = 20.0
# A traced request is sent up to TRACE_ATTEMPTS times, each waited for TRACE_WAIT_S.
TRACE_ATTEMPTS = 3
TRACE_WAIT_S = 8.0
PROMPT = "We hold these truths to be self-evident obs-7431"
SECRET = "sk-obs-test-never-logged-5521"


class Receiver:
    """An OTLP/HTTP traces endpoint that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.add(self.headers.get("Content-Type", ""), body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, content_type: str, body: bytes) -> None:
        # Triton 2.51 exports OTLP/JSON, the Python exporter OTLP protobuf.
        if content_type.startswith("application/json"):
            spans = [
                {
                    "source": "triton",
                    "name": s["name"],
                    "trace_id": s["traceId"].lower(),
                    "span_id": s["spanId"].lower(),
                    "parent_id": s.get("parentSpanId", "").lower(),
                    "attributes": {a["key"]: a["value"] for a in s.get("attributes", [])},
                }
                for rs in json.loads(body)["resourceSpans"]
                for ss in rs["scopeSpans"]
                for s in ss["spans"]
            ]
        else:
            request = ExportTraceServiceRequest.FromString(body)
            spans = [
                {
                    "source": "gateway",
                    "name": s.name,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_id": s.parent_span_id.hex(),
                    "attributes": {a.key: _any_value(a.value) for a in s.attributes},
                }
                for rs in request.resource_spans
                for ss in rs.scope_spans
                for s in ss.spans
            ]
        with self._lock:
            self.spans.extend(spans)

    def of_trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _any_value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value"))


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def traced_triton(receiver: Receiver, run_dir: Path) -> Iterator[TritonFleet]:
    endpoint = receiver.url.removeprefix("http://")
    fleet = TritonFleet(
        count=1,
        port_base=find_free_port_base(1),
        model_repository=MODEL_REPOSITORY,
        log_dir=run_dir / "traced-triton",
        extra_args=[
            "--trace-config=mode=opentelemetry",
            "--trace-config=rate=1",
            "--trace-config=level=TIMESTAMPS",
            f"--trace-config=opentelemetry,url={endpoint}",
            "--trace-config=opentelemetry,bsp_schedule_delay=100",
            "--trace-config=opentelemetry,resource=service.name=triton",
        ],
    )
    with fleet:
        _wait_for_triton_export(fleet, receiver)
        yield fleet


def _wait_for_triton_export(fleet: TritonFleet, receiver: Receiver) -> None:
    """Tests start once Triton's exporter has delivered a span: a traced request's spans
    can be lost right after Triton starts (seen once in CI: the first traced request,
    1.3 s after the start, never had its span arrive)."""
    trace_id = secrets.token_hex(16)
    headers = {
        "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
        "Content-Type": "application/json",
    }
    url = f"{fleet.servers[0].http_url}/v2/models/embed/infer"
    deadline = time.monotonic() + SPAN_WAIT_S
    while not any(s["source"] == "triton" for s in receiver.of_trace(trace_id)):
        assert time.monotonic() < deadline, "Triton exported no span of a traced request"
        request = urllib.request.Request(
            url, json.dumps(EMBED_BODY).encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200
        time.sleep(0.5)


@contextmanager
def traced_gateway(backend: str, receiver: Receiver, run_dir: Path, name: str) -> Iterator[Gateway]:
    """A gateway exporting its spans to ``receiver`` (sampling only traced callers), in
    front of the traced Triton at ``backend``; once it serves both models."""
    config = run_dir / f"{name}.toml"
    config.write_text("[admission]\nsheddable_fraction = 0.0\n")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export spans within 0.1 s
        gw = start_gateway(
            [backend],
            run_dir / f"{name}.log",
            "--config",
            str(config),
            "--trace-exporter",
            "otlp",
            "--trace-endpoint",
            receiver.url,
            "--trace-sample-ratio",
            "0",
        )
    try:
        deadline = time.monotonic() + 60
        while not _ready(gw, "embed") or not _ready(gw, "tiny_lm"):
            assert time.monotonic() < deadline, gw.log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield gw
    finally:
        stop_gateway(gw)


@pytest.fixture(scope="module")
def obs_gateway(traced_triton: TritonFleet, receiver: Receiver, run_dir: Path) -> Iterator[Gateway]:
    """Its backend gRPC-only: every call, unary or stream, goes over gRPC."""
    server = traced_triton.servers[0]
    backend = f"grpc://{server.grpc_url}?metrics={server.metrics_url}"
    with traced_gateway(backend, receiver, run_dir, "obs-gateway") as gw:
        yield gw


@pytest.fixture(scope="module")
def obs_http_gateway(
    traced_triton: TritonFleet, receiver: Receiver, run_dir: Path
) -> Iterator[Gateway]:
    """Its backend with its HTTP endpoint, as ``make run`` starts it: ``infer`` and
    ``generate_stream`` go to Triton over HTTP, the trace context in headers."""
    with traced_gateway(traced_triton.servers[0].backend_url, receiver, run_dir, "obs-http") as gw:
        yield gw


def _ready(gw: Gateway, model: str) -> bool:
    return http_status(f"{gw.url}/v2/models/{model}/ready") == 200


EMBED_BODY = {
    "inputs": [
        {
            "name": "INPUT",
            "datatype": "FP32",
            "shape": [1, 384],
            "data": np.zeros(384, dtype=np.float32).tolist(),
        }
    ]
}


async def _scrape(
    session: aiohttp.ClientSession, gw: Gateway
) -> dict[tuple[str, frozenset[Any]], float]:
    async with session.get(gw.url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _series(model: str, backend: str, policy: str) -> dict[str, str]:
    return {"model": model, "backend": backend, "policy": policy, "tenant": "-"}


async def _stream_events(session: aiohttp.ClientSession, gw: Gateway, **kw: Any) -> int:
    body = {"text_input": PROMPT, "max_tokens": 8, "stream": True}
    async with session.post(gw.url + "/v2/models/tiny_lm/generate_stream", json=body, **kw) as r:
        assert r.status == 200, await r.text()
        assert r.headers["x-request-id"]
        text = await r.text()
    return sum(1 for line in text.splitlines() if line.startswith("data: "))


async def test_metrics_follow_a_scripted_sequence(obs_gateway: Gateway) -> None:
    gw = obs_gateway
    async with aiohttp.ClientSession() as session:
        before = await _scrape(session, gw)
        for _ in range(2):
            async with session.post(gw.url + "/v2/models/embed/infer", json=EMBED_BODY) as r:
                assert r.status == 200, await r.text()
        async with session.post(gw.url + "/v2/models/no_such_model/infer", json=EMBED_BODY) as r:
            assert r.status == 404
        async with session.post(
            gw.url + "/v2/models/embed/infer",
            json=EMBED_BODY,
            headers={"x-meshgate-priority": "sheddable"},
        ) as r:
            assert r.status == 429
            assert (await r.json())["type"] == "over_limit"
        events = await _stream_events(session, gw)
        after = await _scrape(session, gw)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    embed = _series("embed", "b0", "hybrid")
    tiny = _series("tiny_lm", "b0", "hybrid")
    refused = _series("embed", "-", "hybrid")
    unknown = _series("-", "-", "-")
    assert delta("meshgate_requests_total", **embed, code="200") == 2
    assert delta("meshgate_requests_total", **unknown, code="404") == 1
    assert delta("meshgate_requests_total", **refused, code="429") == 1
    assert delta("meshgate_requests_total", **tiny, code="200") == 1
    assert (
        delta(
            "meshgate_admission_refusals_total",
            model="embed",
            policy="hybrid",
            tenant="-",
            reason="over_limit",
        )
        == 1
    )
    assert delta("meshgate_request_duration_seconds_count", **embed) == 2
    assert delta("meshgate_gateway_overhead_seconds_count", **embed) == 2
    assert delta("meshgate_gateway_overhead_seconds_sum", **embed) > 0
    # The gateway's own time is part of, and less than, the end-to-end time.
    assert delta("meshgate_gateway_overhead_seconds_sum", **embed) < delta(
        "meshgate_request_duration_seconds_sum", **embed
    )
    assert delta("meshgate_time_to_first_token_seconds_count", **tiny) == 1
    assert events >= 2
    assert delta("meshgate_inter_token_seconds_count", **tiny) == events - 1
    assert delta("meshgate_scoring_seconds_count", policy="hybrid") == 4
    assert delta("meshgate_failovers_total", **embed) == 0
    # Per-backend gauges, read from the fleet state at scrape time.
    slot = {"backend": "b0", "model": "embed"}
    assert _value(after, "meshgate_backend_inflight", **slot) == 0
    assert ("meshgate_backend_queue_depth", frozenset(slot.items())) in after
    age = after[("meshgate_backend_signal_age_seconds", frozenset(slot.items()))]
    assert 0 <= age < 30
    assert ("meshgate_backend_ejections_total", frozenset({"backend": "b0"}.items())) in after


async def _wait_for(
    receiver: Receiver, trace_id: str, want: int, wait_s: float
) -> list[dict[str, Any]] | None:
    """The trace's spans once ``want`` upstream-joined Triton spans have arrived, or None
    after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        spans = receiver.of_trace(trace_id)
        gateway_spans = [s for s in spans if s["source"] == "gateway"]
        upstream = {s["span_id"] for s in gateway_spans if s["name"] == "upstream"}
        joined = [s for s in spans if s["source"] == "triton" and s["parent_id"] in upstream]
        server = [s for s in gateway_spans if s["parent_id"] and s["name"].startswith("POST")]
        if len(joined) >= want and server:
            return spans
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("gateway_kind", ["obs_gateway", "obs_http_gateway"])
@pytest.mark.parametrize("surface", ["infer", "generate_stream"])
async def test_trace_joins_caller_gateway_and_triton(
    request: pytest.FixtureRequest, receiver: Receiver, surface: str, gateway_kind: str
) -> None:
    """Over gRPC (metadata) and over HTTP (headers), Triton's spans join the trace under
    the gateway's upstream span."""
    obs_gateway: Gateway = request.getfixturevalue(gateway_kind)
    request_id = f"obs-trace-{surface}"
    unsampled_id = f"obs-unsampled-{surface}"
    spans: list[dict[str, Any]] | None = None
    async with aiohttp.ClientSession() as session:
        # No traceparent at ratio 0: nothing of this one may be exported.
        async with session.post(
            obs_gateway.url + "/v2/models/embed/infer",
            json=EMBED_BODY,
            headers={"x-request-id": unsampled_id},
        ) as r:
            assert r.status == 200
        # Triton's exporter now and then loses a traced request's spans (seen at its
        # start, see _wait_for_triton_export, and once mid-run in CI, where the gateway's
        # four spans of the trace arrived and Triton's never did): a traced request whose
        # Triton span has not come within TRACE_WAIT_S is sent again, as a new trace.
        for _ in range(TRACE_ATTEMPTS):
            trace_id = secrets.token_hex(16)
            caller_span = secrets.token_hex(8)
            headers = {"traceparent": f"00-{trace_id}-{caller_span}-01", "x-request-id": request_id}
            if surface == "infer":
                async with session.post(
                    obs_gateway.url + "/v2/models/embed/infer", json=EMBED_BODY, headers=headers
                ) as r:
                    assert r.status == 200
                    assert r.headers["x-request-id"] == request_id
                model, route = "embed", "POST /v2/models/{model}/infer"
            else:
                assert await _stream_events(session, obs_gateway, headers=headers) >= 2
                model, route = "tiny_lm", "POST /v2/models/{model}/generate_stream"
            spans = await _wait_for(receiver, trace_id, want=1, wait_s=TRACE_WAIT_S)
            if spans is not None:
                break
    assert spans is not None, f"no trace of {TRACE_ATTEMPTS} joined Triton's span"
    gateway_spans = {s["name"]: s for s in spans if s["source"] == "gateway"}
    assert set(gateway_spans) == {route, "scoring", "admission", "upstream"}, spans
    server = gateway_spans[route]
    assert server["parent_id"] == caller_span
    for child in ("scoring", "admission", "upstream"):
        assert gateway_spans[child]["parent_id"] == server["span_id"]
    attributes = server["attributes"]
    assert attributes["meshgate.request_id"] == request_id
    assert attributes["meshgate.model"] == model
    assert attributes["meshgate.backend"] == "b0"
    assert attributes["meshgate.policy"] == "hybrid"
    assert attributes["meshgate.tokens"] >= 1
    assert attributes["meshgate.ttft_s"] > 0
    assert attributes["http.response.status_code"] == 200
    # Triton's own spans hang under the gateway's upstream span: the context got there.
    upstream = gateway_spans["upstream"]["span_id"]
    triton = [s for s in spans if s["source"] == "triton" and s["parent_id"] == upstream]
    assert triton
    with receiver._lock:
        leaked = [
            s for s in receiver.spans if s["attributes"].get("meshgate.request_id") == unsampled_id
        ]
    assert not leaked


async def test_request_log_lines_are_json_without_prompt_or_keys(obs_gateway: Gateway) -> None:
    offset = obs_gateway.log_path.stat().st_size
    auth = {"Authorization": f"Bearer {SECRET}", "x-api-key": SECRET}
    async with aiohttp.ClientSession() as session:
        ids = {}
        for name, path, body, extra in [
            ("ok", "/v2/models/embed/infer", EMBED_BODY, {}),
            ("missing", "/v2/models/no_such_model/infer", EMBED_BODY, {}),
            ("refused", "/v2/models/embed/infer", EMBED_BODY, {"x-meshgate-priority": "sheddable"}),
        ]:
            async with session.post(
                obs_gateway.url + path, json=body, headers={**auth, **extra}
            ) as r:
                await r.read()
                # Generated when the client sent none, on errors as on successes.
                ids[name] = (r.status, r.headers["x-request-id"])
        stream_id = "client-chosen-id-1"
        assert (
            await _stream_events(session, obs_gateway, headers={**auth, "x-request-id": stream_id})
            >= 2
        )
        ids["stream"] = (200, stream_id)
    assert [status for status, _ in ids.values()] == [200, 404, 429, 200]
    assert len({rid for _, rid in ids.values()}) == 4

    deadline = time.monotonic() + 10
    while True:
        with obs_gateway.log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode()
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        by_id = {
            line.get("request_id"): line for line in lines if line["logger"] == "meshgate.request"
        }
        if all(rid in by_id for _, rid in ids.values()):
            break
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(0.1)
    for status, rid in ids.values():
        line = by_id[rid]
        assert line["level"] == "INFO"
        assert line["status"] == status
        assert line["tenant"] == "-"
        assert line["latency_ms"] > 0
    assert by_id[ids["stream"][1]]["model"] == "tiny_lm"
    assert by_id[ids["stream"][1]]["tokens"] >= 2
    assert by_id[ids["ok"][1]]["backend"] == "b0"
    assert PROMPT not in text and "self-evident" not in text
    assert SECRET not in text
