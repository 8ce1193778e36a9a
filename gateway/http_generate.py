"""Triton's ``generate_stream`` over HTTP, for every API surface that streams a model's
responses (``/v2 ... /generate_stream`` and ``/v1``): open a stream on one backend,
read its events, and relay the rest of it on the fast lane.

A refusal before the first event becomes the gateway's error (404: this backend lost
the model, so failover may try another); an error event in the stream raises when its
payload is read. See gateway/http_stream.py for the transport itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, TypeVar

import orjson

from .errors import TRITON_UNKNOWN_MODEL, ModelGone, UpstreamError, UpstreamStalled
from .fleet import Backend
from .forward import Replies, StreamReplies, Timeouts
from .http_stream import SseStream, StreamRefused
from .http_upstream import UpstreamConnectionError
from .router import Lease

_JSON = "application/json"
T = TypeVar("T")

# How Triton's HTTP endpoint words data of the wrong JSON type (e.g. "max_tokens": true)
# and a body that is not JSON, which it answers with 500 although the client is at fault.
_TRITON_CLIENT_FAULTS = ("Unable to parse 'data'", "failed to parse the request JSON buffer")


def client_fault_status(status: int, message: str) -> int:
    """400 for what Triton answers 500 but is the client's fault, else ``status``."""
    return 400 if status == 500 and message.startswith(_TRITON_CLIENT_FAULTS) else status


def error_message(body: bytes | bytearray) -> str:
    """The message of a Triton error body (``{"error": ...}``, bare or as an event), or
    the body itself."""
    try:
        error = orjson.loads(body.removeprefix(b"data:")).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    return error if isinstance(error, str) else body.decode("utf-8", "replace")


async def generate_events(
    backend: Backend,
    path: str,
    body: bytes,
    trace: Sequence[tuple[str, str]],
    idle: float,
    deadline: float,
    opened: list[SseStream],
    check: Callable[[Backend], object] | None = None,
) -> AsyncGenerator[tuple[bytes, dict[str, Any]], None]:
    """Triton's events for ``body`` POSTed to ``path`` on ``backend``'s HTTP endpoint:
    each as it sent it, and its payload (an error event raises). The stream is appended
    to ``opened`` (the fast lane relays the rest of it); closing the generator closes
    the stream: read to its end, its connection is kept for another; cut short, the
    connection closes and Triton cancels. ``check(backend)`` runs once the request is
    sent, off the time to first token; what it raises ends the stream before its first
    event."""
    assert backend.streams is not None
    headers = [("Content-Type", _JSON), *trace]
    stream = await backend.streams.open(backend.id, path, headers, body, idle, deadline)
    opened.append(stream)
    try:
        if check is not None:
            check(backend)
        try:
            await stream.head()
        except StreamRefused as exc:
            message = error_message(exc.body)
            if exc.status == 404:  # the fleet knows the model: this backend lost it
                raise ModelGone(message) from None
            raise UpstreamError(message, client_fault_status(exc.status, message)) from None
        while (event := await stream.next_event()) is not None:
            yield event, event_payload(event)
    finally:
        stream.close()


class StreamAttempts:
    """What a streaming API's attempts share (forward.open_stream calls the subclass's
    ``__call__`` once per backend it tries, which starts one with ``over_http`` or
    ``over_grpc``): the lease, the request's timeouts and deadline, and the live
    attempt's HTTP stream, if it is one (the fast lane relays it). Objects, not
    closures over the handler's variables (see EventRelay)."""

    __slots__ = ("_deadline", "_lease", "_timeouts", "live_http")

    def __init__(self, lease: Lease, timeouts: Timeouts, deadline: float) -> None:
        self._lease = lease
        self._timeouts = timeouts
        self._deadline = deadline  # loop time
        self.live_http: list[SseStream] = []

    def over_http(
        self,
        backend: Backend,
        path: str,
        body: bytes,
        check: Callable[[Backend], object] | None = None,
    ) -> AsyncGenerator[tuple[bytes, dict[str, Any]], None]:
        """``generate_events`` on the backend's HTTP endpoint, its stream the live one."""
        self.live_http.clear()
        trace = self._lease.trail.metadata
        return generate_events(
            backend, path, body, trace, self._timeouts.idle, self._deadline, self.live_http, check
        )

    def over_grpc(
        self, backend: Backend, wire: bytes, left: float, convert: Callable[[Any], T]
    ) -> Replies[T]:
        """ModelStreamInfer with ``left`` of the deadline, each reply through ``convert``."""
        self.live_http.clear()
        attempt = self._timeouts._replace(total=left)
        return StreamReplies(backend, wire, attempt, self._lease.trail.metadata, convert)


def event_payload(event: bytes) -> dict[str, Any]:
    """The JSON object of one of Triton's events; an error event raises."""
    payload = _parse_event(event.partition(b"data:")[2])
    error = payload.get("error")
    if isinstance(error, str):
        if error.startswith(TRITON_UNKNOWN_MODEL):
            raise ModelGone(error)
        raise UpstreamError(error, 400)
    return payload


def _parse_event(data: bytes) -> dict[str, Any]:
    try:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            # Triton writes a BYTES output into its JSON as raw bytes, so a character
            # split across two responses is invalid UTF-8 here: such text is kept as
            # surrogate escapes (which orjson refuses), for the reader's incremental
            # decoder to put back together.
            payload = json.loads(data.decode("utf-8", "surrogateescape"))
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise UpstreamError(f"malformed event from Triton: {bytes(data[:200])!r}", 502)
    return payload


class EventRelay:
    """The rest of an HTTP stream on the fast lane: each event handed to ``on_event``
    from the upstream connection's callback, no task woken per token. A stall or a
    broken connection counts against the backend, as forward.open_stream's rest does.

    Objects, not closures: a stream's objects live as long as it does, and every full
    garbage collection walks them (a closure costs a cell per variable it captures, a
    function and a tuple; 1,000 streams' worth is a stall, gateway/loop_lag.py)."""

    __slots__ = ("lease", "stream")

    def __init__(self, stream: SseStream, lease: Lease) -> None:
        self.stream = stream
        self.lease = lease

    def on_event(self, event: bytes) -> None:
        raise NotImplementedError

    def __call__(self, event: bytes) -> None:
        self.lease.token()
        self.on_event(event)

    async def run(self) -> None:
        """Until the stream ends (or fails)."""
        try:
            await self.stream.relay(self)
        except (UpstreamStalled, UpstreamConnectionError):
            self.lease.backend_failed()
            raise
