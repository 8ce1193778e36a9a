"""The per-request Trail, its metrics and spans, request ids and JSON log lines."""

from __future__ import annotations

import json
import logging
import sys
from time import perf_counter_ns

import pytest
from aiohttp.test_utils import make_mocked_request
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from fastpath.scoring import Scorer, ScoringConfig
from fastpath.state import POLICY_HYBRID
from gateway.config import ConfigError, GatewayConfig
from gateway.fleet import Fleet
from gateway.logs import JsonFormatter
from gateway.metrics import Metrics
from gateway.outliers import OutlierDetector
from gateway.telemetry import Telemetry, Trail, _request_id
from gateway.tracing import Tracing, incoming_context, trace_metadata, tracing_from_config

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


@pytest.fixture
def fleet() -> Fleet:
    fleet = Fleet(GatewayConfig())
    fleet.state.slot("b0", "embed")
    fleet.state.slot("b1", "embed")
    return fleet


def _telemetry(fleet: Fleet, exporter: InMemorySpanExporter, ratio: float) -> Telemetry:
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Telemetry(_metrics(fleet), Tracing(provider, ratio))


def _metrics(fleet: Fleet) -> Metrics:
    scorer = Scorer(ScoringConfig(), fleet.state.array)
    return Metrics(fleet, OutlierDetector(fleet, GatewayConfig().outlier), scorer)


def _serve(telemetry: Telemetry, headers: dict[str, str], tokens: int) -> Trail:
    """One request as the middleware, router and lease report it: a failover, then
    ``tokens`` streamed responses."""
    tracer = telemetry.tracing.tracer
    assert tracer is not None
    span = tracer.start_span("POST /x", context=incoming_context(headers), kind=SpanKind.SERVER)
    trail = Trail(telemetry, "rid-1", span, trace_metadata(span.get_span_context()))
    trail.model = "embed"
    start = perf_counter_ns()
    trail.decided(POLICY_HYBRID, start, start + 1000, start + 2000)
    trail.attempt("b0")
    trail.attempt("b1")
    trail.first_response()
    for _ in range(tokens - 1):
        trail.token()
    trail.upstream_done()
    trail.finish(make_mocked_request("POST", "/x"), 200)
    return trail


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_trail_records_metrics(fleet: Fleet) -> None:
    telemetry = _telemetry(fleet, InMemorySpanExporter(), 0.0)
    _serve(telemetry, {}, tokens=5)
    metrics = telemetry.metrics
    assert metrics is not None
    b1 = {"model": "embed", "backend": "b1", "policy": "hybrid", "tenant": "-"}
    b0 = {**b1, "backend": "b0"}
    assert _sample(metrics, "meshgate_requests_total", **b1, code="200") == 1
    # The attempt on b0 failed over to b1: counted against b0.
    assert _sample(metrics, "meshgate_failovers_total", **b0) == 1
    assert _sample(metrics, "meshgate_failovers_total", **b1) == 0
    assert _sample(metrics, "meshgate_inter_token_seconds_count", **b1) == 4
    assert _sample(metrics, "meshgate_time_to_first_token_seconds_count", **b1) == 1
    assert _sample(metrics, "meshgate_request_duration_seconds_count", **b1) == 1
    assert _sample(metrics, "meshgate_scoring_seconds_sum", policy="hybrid") == pytest.approx(2e-6)


def test_unknown_model_names_do_not_become_series(fleet: Fleet) -> None:
    metrics = _metrics(fleet)
    assert metrics.model_label("embed") == "embed"
    assert metrics.model_label("made-up-by-a-client") == "-"
    assert metrics.model_label(None) == "-"


def test_span_tree_follows_the_callers_context(fleet: Fleet) -> None:
    exporter = InMemorySpanExporter()
    telemetry = _telemetry(fleet, exporter, 0.0)  # ratio 0: only the caller's flag samples
    trail = _serve(telemetry, {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}, tokens=3)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /x", "scoring", "admission", "upstream"}
    server = spans["POST /x"]
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CALLER_SPAN
    assert all(f"{s.context.trace_id:032x}" == CALLER_TRACE for s in spans.values())
    for child in ("scoring", "admission", "upstream"):
        assert spans[child].parent is not None
        assert spans[child].parent.span_id == server.context.span_id
    # The failed-over attempt and the served one are both upstream spans; the last wins here.
    upstream = spans["upstream"]
    assert upstream.attributes is not None and upstream.attributes["meshgate.backend"] == "b1"
    assert server.attributes is not None and server.attributes["meshgate.tokens"] == 3
    # What Triton is sent names the upstream span as its parent.
    assert dict(trail.metadata)["traceparent"] == (
        f"00-{CALLER_TRACE}-{upstream.context.span_id:016x}-01"
    )


def test_ratio_zero_without_caller_records_nothing(fleet: Fleet) -> None:
    exporter = InMemorySpanExporter()
    trail = _serve(_telemetry(fleet, exporter, 0.0), {}, tokens=1)
    assert exporter.get_finished_spans() == ()
    # Still a valid context for Triton, with the sampled flag (bit 0) clear.
    version, trace_id, span_id, flags = dict(trail.metadata)["traceparent"].split("-")
    assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
    assert int(flags, 16) & 1 == 0


def test_invalid_traceparent_is_ignored() -> None:
    assert incoming_context({"traceparent": "00-zz-yy-01"}) is None
    assert incoming_context({}) is None


@pytest.mark.parametrize(
    ("given", "kept"),
    [("abc-123", True), ("a" * 128, True), ("a" * 129, False), ("has space", False),
     ('quote"', False), ("new\nline", False)],
)  # fmt: skip
def test_request_id_is_kept_only_when_safe(given: str, kept: bool) -> None:
    request = make_mocked_request("GET", "/", headers={"x-request-id": given})
    assert (_request_id(request) == given) is kept


def test_generated_request_ids_differ() -> None:
    request = make_mocked_request("GET", "/")
    assert _request_id(request) != _request_id(request)


def test_tracing_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="trace_exporter"):
        tracing_from_config(GatewayConfig(trace_exporter="jaeger"))
    with pytest.raises(ConfigError, match="trace_sample_ratio"):
        tracing_from_config(GatewayConfig(trace_exporter="console", trace_sample_ratio=1.5))
    assert tracing_from_config(GatewayConfig()).tracer is None


def test_json_formatter_one_object_per_line() -> None:
    record = logging.LogRecord("meshgate.request", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"request_id": "r1", "status": 200}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["msg"] == "request" and parsed["request_id"] == "r1" and parsed["status"] == 200
    try:
        raise ValueError("boom")
    except ValueError:
        failing = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    parsed = json.loads(JsonFormatter().format(failing))
    assert "ValueError: boom" in parsed["exc"]
