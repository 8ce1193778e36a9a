"""Per-request telemetry: the ``Trail`` each request carries from arrival to answer.

The middleware opens a Trail (request id, clock, request span); the router and the
lease report into it (scoring, refusals, attempts, first and later responses); the
middleware closes it: one metrics update, one span end, one JSON log line. Inference
requests (their handler set ``trail.model``) log at INFO; other routes at DEBUG.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from time import perf_counter_ns

from aiohttp import web
from opentelemetry.trace import (
    Span,
    SpanKind,
    Status,
    StatusCode,
    get_current_span,
    set_span_in_context,
)

from fastpath.state import POLICY_NAMES

from .logs import REQUEST_LOG
from .metrics import NONE, Metrics, Series
from .tracing import Tracing, incoming_context, trace_metadata
from .upstream import Metadata

REQUEST_ID_HEADER = "x-request-id"
# What a client may choose as request id: no spaces, quotes or control characters, so
# it is safe in a header and a log line; anything else is replaced by a generated id.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
POLICY_LABELS = {policy: name for name, policy in POLICY_NAMES.items()}
# The bits of a 128-bit random number that uuid.UUID(version=4) overwrites, and their values.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Telemetry:
    """The app's metrics (None when turned off) and tracing."""

    def __init__(self, metrics: Metrics | None, tracing: Tracing) -> None:
        self.metrics = metrics
        self.tracing = tracing


TELEMETRY = web.AppKey("telemetry", Telemetry)


class Trail:
    """What one request reports; the labels start as ``-`` and fill in as it goes."""

    __slots__ = (
        "_attempt_span",
        "_last_reply_ns",
        "_series",
        "_span",
        "_started_ns",
        "_telemetry",
        "_upstream_from_ns",
        "_upstream_to_ns",
        "backend",
        "metadata",
        "model",
        "policy",
        "request_id",
        "tenant",
        "tokens",
        "ttft_s",
    )

    def __init__(
        self, telemetry: Telemetry, request_id: str, span: Span | None, metadata: Metadata
    ) -> None:
        self._telemetry = telemetry
        self._started_ns = perf_counter_ns()
        self._span = span
        self._attempt_span: Span | None = None
        self._series: Series | None = None
        self._upstream_from_ns = 0
        self._upstream_to_ns = 0
        self._last_reply_ns = 0
        self.request_id = request_id
        # The model a handler serves; None: not an inference request.
        self.model: str | None = None
        self.backend = NONE
        self.policy = NONE
        self.tenant = NONE  # until tenants exist
        self.tokens = 0
        self.ttft_s: float | None = None
        # gRPC metadata for Triton: the trace context of the current attempt.
        self.metadata = metadata

    # -- reported by the router and the lease ---------------------------------------------

    def decided(self, policy: int, started_ns: int, ranked_ns: int, decided_ns: int) -> None:
        """Scoring (``started``..``ranked``) and the admission decision (..``decided``)."""
        self.policy = POLICY_LABELS[policy]
        metrics = self._telemetry.metrics
        if metrics is not None:
            metrics.observe_scoring(self.policy, (decided_ns - started_ns) * 1e-9)
        if self._span is not None and self._span.is_recording():
            self._child("scoring", started_ns, ranked_ns)
            self._child("admission", ranked_ns, decided_ns)

    def refused(self, reason: str) -> None:
        metrics = self._telemetry.metrics
        if metrics is not None:
            metrics.count_refusal(metrics.model_label(self.model), self.policy, self.tenant, reason)

    def attempt(self, backend: str) -> None:
        """A call to ``backend`` starts; an earlier attempt failed over to it."""
        now = perf_counter_ns()
        if self.backend != NONE:
            metrics = self._telemetry.metrics
            if metrics is not None:
                self._labels(metrics).failovers.inc()
            if self._attempt_span is not None:
                self._attempt_span.set_status(Status(StatusCode.ERROR, "failed over"))
                self._attempt_span.end()
        else:
            self._upstream_from_ns = now
        self.backend = backend
        self._series = None
        tracer = self._telemetry.tracing.tracer
        if tracer is not None and self._span is not None and self._span.is_recording():
            self._attempt_span = tracer.start_span(
                "upstream",
                context=set_span_in_context(self._span),
                kind=SpanKind.CLIENT,
                attributes={"meshgate.backend": backend, "meshgate.model": self.model or NONE},
            )
            self.metadata = trace_metadata(self._attempt_span.get_span_context())

    def first_response(self) -> None:
        now = self._last_reply_ns = perf_counter_ns()
        self.tokens = 1
        self.ttft_s = (now - self._started_ns) * 1e-9
        metrics = self._telemetry.metrics
        if metrics is not None:
            self._labels(metrics).ttft.observe(self.ttft_s)

    def token(self) -> None:
        """One more streamed response: O(1), a clock read and a histogram bucket."""
        now = perf_counter_ns()
        series = self._series
        if series is not None:
            series.inter_token.observe((now - self._last_reply_ns) * 1e-9)
        self._last_reply_ns = now
        self.tokens += 1

    def upstream_done(self) -> None:
        """The lease closed: no more upstream responses."""
        self._upstream_to_ns = self._last_reply_ns or perf_counter_ns()
        if self._attempt_span is not None:
            self._attempt_span.set_attribute("meshgate.tokens", self.tokens)
            self._attempt_span.end()
            self._attempt_span = None

    # -- closed by the middleware -----------------------------------------------------------

    def finish(self, request: web.Request, status: int) -> None:
        elapsed_ns = perf_counter_ns() - self._started_ns
        upstream_ns = self._upstream_to_ns - self._upstream_from_ns if self._upstream_to_ns else 0
        metrics = self._telemetry.metrics
        if metrics is not None and self.model is not None:
            series = self._labels(metrics)
            series.duration.observe(elapsed_ns * 1e-9)
            series.overhead.observe((elapsed_ns - upstream_ns) * 1e-9)
            metrics.count_request(
                metrics.model_label(self.model), self.backend, self.policy, self.tenant, status
            )
        fields = {
            "request_id": self.request_id,
            "tenant": self.tenant,
            "method": request.method,
            "path": request.path,
            "model": self.model or NONE,
            "backend": self.backend,
            "policy": self.policy,
            "status": status,
            # Whole microseconds in ms (a third of round(x, 3)'s cost, which formats x).
            "latency_ms": round(elapsed_ns / 1000) / 1000,
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1e6) / 1000,
            "tokens": self.tokens,
        }
        if self._span is not None:
            self._end_span(status, fields)
        level = logging.INFO if self.model is not None else logging.DEBUG
        REQUEST_LOG.write(level, fields)

    # -- helpers ------------------------------------------------------------------------------

    def _labels(self, metrics: Metrics) -> Series:
        # Looked up once per backend tried: later calls (per token) reuse it.
        if self._series is None:
            self._series = metrics.series(
                metrics.model_label(self.model), self.backend, self.policy, self.tenant
            )
        return self._series

    def _child(self, name: str, start_ns: int, end_ns: int) -> None:
        # Spans recorded after the fact: perf_counter stamps moved onto the epoch clock.
        tracer = self._telemetry.tracing.tracer
        assert tracer is not None and self._span is not None, "called only while recording"
        offset = time.time_ns() - perf_counter_ns()
        span = tracer.start_span(
            name,
            context=set_span_in_context(self._span),
            start_time=start_ns + offset,
            attributes={"meshgate.policy": self.policy, "meshgate.model": self.model or NONE},
        )
        span.end(end_time=end_ns + offset)

    def _end_span(self, status: int, fields: dict[str, object]) -> None:
        span = self._span
        assert span is not None
        if span.is_recording():
            span.set_attributes(
                {
                    "http.response.status_code": status,
                    "meshgate.request_id": self.request_id,
                    "meshgate.model": self.model or NONE,
                    "meshgate.backend": self.backend,
                    "meshgate.policy": self.policy,
                    "meshgate.tokens": self.tokens,
                }
            )
            if self.ttft_s is not None:
                span.set_attribute("meshgate.ttft_s", self.ttft_s)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            fields["trace_id"] = f"{span.get_span_context().trace_id:032x}"
        span.end()


TRAIL = web.RequestKey("trail", Trail)


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is not None and _CLIENT_REQUEST_ID.fullmatch(given):
        return given
    # uuid.uuid4().hex without building a UUID object (1.8 µs here against 3.2): 128
    # random bits with the version (4) and variant (RFC 4122) bits set as uuid4 sets
    # them. From the random module, not os.urandom: an id names a request, it guards
    # nothing, and the generator costs no system call.
    value = random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET
    return f"{value:032x}"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: opens the request's Trail and closes it with its status."""
    telemetry = request.app[TELEMETRY]
    incoming = incoming_context(request.headers)
    tracer = telemetry.tracing.tracer
    span = None
    metadata: Metadata = ()
    if tracer is not None and (incoming is not None or telemetry.tracing.samples_new_traces):
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        name = f"{request.method} {route}"
        span = tracer.start_span(name, context=incoming, kind=SpanKind.SERVER)
        metadata = trace_metadata(span.get_span_context())
    elif incoming is not None:
        # Not tracing here, but Triton's spans still join the caller's trace.
        metadata = trace_metadata(get_current_span(incoming).get_span_context())
    trail = Trail(telemetry, _request_id(request), span, metadata)
    request[TRAIL] = trail
    status = 499  # the handler was cancelled: the client hung up
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        # Once this task's step has written the answer (the fast lane and aiohttp write
        # a unary answer in the step that returns it): the metrics and the log line
        # (~20 µs in the running gateway) are then off the client's critical path.
        asyncio.get_running_loop().call_soon(trail.finish, request, status)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streamed or error, names its request id."""
    trail = request.get(TRAIL)
    if trail is not None:
        response.headers[REQUEST_ID_HEADER] = trail.request_id
