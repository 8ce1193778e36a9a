"""OpenTelemetry traces: the tracer the per-request ``Trail`` uses, and W3C trace context.

An incoming ``traceparent``/``tracestate`` is honoured; what goes to Triton (gRPC
metadata) is the context of the upstream attempt's span, so Triton's own spans join
the client's trace. With tracing off (exporter ``none``) nothing is recorded, but an
incoming context is still passed through to Triton.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanContext, Tracer, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .config import ConfigError, GatewayConfig
from .upstream import Metadata

EXPORTERS = ("none", "console", "otlp")
_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """The gateway's tracer, or none when tracing is off."""

    def __init__(self, provider: TracerProvider | None, sample_ratio: float = 0.0) -> None:
        self.provider = provider
        self.tracer: Tracer | None = provider.get_tracer("meshgate") if provider else None
        # At ratio 0 a request without a caller's trace is never recorded: skip its
        # span entirely rather than pay for a non-recording one.
        self.samples_new_traces = sample_ratio > 0.0

    def shutdown(self) -> None:
        """Flush what is still batched; called once at app cleanup."""
        if self.provider is not None:
            self.provider.shutdown()


def provider(exporter: SpanExporter, sample_ratio: float) -> TracerProvider:
    """A provider that samples ``sample_ratio`` of new traces and follows the caller's
    decision when a ``traceparent`` came in."""
    tracer_provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        resource=Resource.create({"service.name": "meshgate"}),
    )
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    return tracer_provider


def tracing_from_config(config: GatewayConfig) -> Tracing:
    """The configured tracing; raises ConfigError for an unknown exporter or ratio."""
    if config.trace_exporter not in EXPORTERS:
        raise ConfigError(
            f"trace_exporter: expected one of {list(EXPORTERS)}, got {config.trace_exporter!r}"
        )
    if not 0.0 <= config.trace_sample_ratio <= 1.0:
        raise ConfigError(
            f"trace_sample_ratio: expected in [0, 1], got {config.trace_sample_ratio!r}"
        )
    if config.trace_exporter == "none":
        return Tracing(None)
    if config.trace_exporter == "console":
        exporter: SpanExporter = ConsoleSpanExporter()
    else:
        # Imported only when chosen: it pulls in `requests`.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # None: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else http://localhost:4318/v1/traces.
        exporter = OTLPSpanExporter(endpoint=config.trace_endpoint)
    return Tracing(provider(exporter, config.trace_sample_ratio), config.trace_sample_ratio)


def incoming_context(headers: Mapping[str, str]) -> Context | None:
    """The caller's W3C trace context, if it sent a valid one."""
    if "traceparent" not in headers:
        return None
    context = _PROPAGATOR.extract(headers)
    return context if get_current_span(context).get_span_context().is_valid else None


def trace_metadata(context: SpanContext) -> Metadata:
    """gRPC metadata that makes ``context`` the parent of Triton's spans."""
    traceparent = (
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    )
    tracestate = context.trace_state.to_header()
    if tracestate:
        return (("traceparent", traceparent), ("tracestate", tracestate))
    return (("traceparent", traceparent),)
