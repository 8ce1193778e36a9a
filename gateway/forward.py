"""Forwarding to the fleet, shared by every API surface: deadlines, failover before the
first byte, and decoded streaming replies that cancel the gRPC call when abandoned."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import grpc
from aiohttp import web

from fastpath import grpc_wire
from fastpath.errors import FramingError

from .api.keys import CONFIG, ROUTER
from .auth import TENANT, TENANTS
from .config import GatewayConfig
from .errors import (
    TRITON_UNKNOWN_MODEL,
    BadRequest,
    GatewayError,
    GatewayTimeout,
    ModelGone,
    Unavailable,
    UpstreamError,
    UpstreamStalled,
)
from .fleet import Backend
from .http_upstream import UpstreamConnectFailed, UpstreamConnectionError
from .router import PRIORITY_HEADER, SESSION_HEADER, Lease, parse_priority
from .telemetry import TRAIL
from .upstream import Metadata, StreamCall, is_connection_failure, upstream_error

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
_NO_TIMEOUT = contextlib.nullcontext()
TIMEOUT_HEADER = "x-meshgate-timeout-ms"
# Appended to each ModelStreamInfer request (serialized messages concatenate as a merge,
# so this adds one entry to its parameters map): a final flag the model sends on its own
# comes as an empty response instead of only as the stream's end.
_ASK_EMPTY_FINAL = grpc_wire.encode_infer_request(
    "", "", "", {"triton_enable_empty_final_response": True}, [], [], []
)


class Timeouts(NamedTuple):
    total: float  # the request's deadline, propagated to Triton as the gRPC deadline
    idle: float  # longest wait for the next streamed response once one has arrived


def request_timeouts(request: web.Request) -> Timeouts:
    """The request's deadline (its header, else the configured default) and the
    configured stream idle timeout, in seconds."""
    config: GatewayConfig = request.app[CONFIG]
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return Timeouts(config.request_timeout_s, config.stream_idle_timeout_s)
    try:
        millis = int(raw)
    except ValueError:
        raise BadRequest(f"{TIMEOUT_HEADER} must be an integer, got {raw!r}") from None
    if millis <= 0:
        raise BadRequest(f"{TIMEOUT_HEADER} must be positive, got {millis}")
    return Timeouts(millis / 1000.0, config.stream_idle_timeout_s)


def check_max_tokens(request: web.Request, max_tokens: Any) -> None:
    """400 when ``max_tokens`` asks for more than the configured max_tokens_limit."""
    limit = request.app[CONFIG].max_tokens_limit
    if limit and type(max_tokens) is int and max_tokens > limit:
        raise BadRequest(
            f"max_tokens is {max_tokens}, over this gateway's limit of {limit}", param="max_tokens"
        )


def admit(request: web.Request, model: str, version: str, affinity: bytes | None) -> Lease:
    """Admit a request for ``model`` (429/503 when refused): its tenant's limits first,
    then its priority header, and the session header or else ``affinity`` (the prompt)
    for prefix_affinity."""
    session = request.headers.get(SESSION_HEADER)
    priority = parse_priority(request.headers.get(PRIORITY_HEADER))
    claim = request.app[TENANTS].claim(request[TENANT])
    try:
        lease = request.app[ROUTER].admit(
            model,
            version,
            priority,
            request[TRAIL],
            # aiohttp decodes header bytes with surrogateescape; this gives the same bytes back.
            session.encode("utf-8", "surrogateescape") if session else affinity,
        )
    except BaseException:
        claim.close()
        raise
    lease.tenant = claim
    return lease


async def with_failover(
    lease: Lease, call: Callable[[Backend, float], Awaitable[T]], timeout: float
) -> T:
    """Run ``call`` on the lease's first backend; if it could not be reached or says it
    does not have the model now, once more on the next-ranked one, within the retry
    budget. Only safe before anything was sent to the client. ``call`` gets the backend
    and what is left of the request's ``timeout`` (seconds since admission), so retries
    share one deadline. Whatever fails once it has passed is a 504: Triton may word a
    missed deadline as an internal error."""
    attempts = min(len(lease.slots), 2)
    # Not a generator of backends: one left unfinished on return would be closed by a
    # GeneratorExit raised through its frame, on every request.
    for attempt, slot in enumerate(lease.slots):
        left = timeout - lease.elapsed()
        if left <= 0:  # an earlier attempt took it all
            raise GatewayTimeout(f"request deadline of {timeout:g} s exceeded")
        backend = lease.attempt(slot)
        final = attempt + 1 >= attempts
        try:
            result = await call(backend, left)
        except grpc.aio.AioRpcError as exc:
            if lease.elapsed() >= timeout:
                raise GatewayTimeout(f"request deadline of {timeout:g} s exceeded") from None
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                lease.model_gone()
                if final or not lease.may_retry():  # a retry takes from the budget
                    raise ModelGone(exc.details() or "model not found") from None
            elif is_connection_failure(exc):
                lease.backend_unreachable()
                if final or not lease.may_retry():  # a retry takes from the budget
                    raise upstream_error(exc) from None
            else:
                raise upstream_error(exc) from None
        except TimeoutError:
            raise GatewayTimeout(f"request deadline of {timeout:g} s exceeded") from None
        except ModelGone:
            lease.model_gone()
            if final or not lease.may_retry():  # a retry takes from the budget
                raise
        except UpstreamConnectionError as exc:
            if isinstance(exc, UpstreamConnectFailed):
                lease.backend_unreachable()
            else:  # lost mid-exchange: the backend, or this request (counts towards ejection)
                lease.backend_failed()
            if final or not lease.may_retry():  # a retry takes from the budget
                raise Unavailable(f"backend {backend.id} unreachable: {exc}") from None
        except UpstreamStalled:
            lease.backend_failed()
            raise
        else:
            lease.backend_ok()
            return result
    raise AssertionError("unreachable: the loop returns or raises")


async def any_backend(backends: list[Backend], call: Callable[[Backend], Awaitable[T]]) -> T:
    """A control-plane call on the first backend that answers."""
    for attempt, backend in enumerate(backends):
        try:
            return await call(backend)
        except grpc.aio.AioRpcError as exc:
            if not (attempt + 1 < len(backends) and is_connection_failure(exc)):
                raise upstream_error(exc) from None
    raise AssertionError("unreachable: the loop returns or raises")


def failure_after_answer(exc: Exception) -> GatewayError:
    """The gateway's error for an upstream call that failed after it began answering:
    nothing can be retried then, and the client is told in-band."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return upstream_error(exc)
    if isinstance(exc, UpstreamConnectionError):
        return UpstreamError(f"the backend's stream broke: {exc}", 502)
    assert isinstance(exc, GatewayError)
    return exc


def decode_reply(decoder: Callable[[bytes], T], reply: bytes) -> T:
    try:
        return decoder(reply)
    except FramingError as exc:
        raise UpstreamError(f"malformed response from Triton: {exc}", 502) from None


class Replies(Protocol[T_co]):
    """A backend's responses to one request, read with ``anext``; ``aclose`` ends the
    upstream call (an async generator is one)."""

    def __anext__(self) -> Awaitable[T_co]: ...

    def aclose(self) -> Awaitable[Any]: ...


class StreamReplies:
    """Decoded responses of one ModelStreamInfer call (each passed through ``convert``),
    read with ``async for`` or ``anext``. A failure, or ``aclose`` when the consumer
    stops early (client hung up, error), cancels the call, so Triton stops generating.

    Waiting for the first response is bounded by the request's deadline only (it may
    queue at Triton); after it, a gap longer than ``timeouts.idle`` ends the stream
    with UpstreamStalled.

    The replies end at the response Triton marks ``triton_final_response`` (it does for
    decoupled models), not at the call's trailers, which arrive ~100 µs later; the call
    is left to finish on its own then (a reset would cancel a request that is done).

    An iterator object, not an async generator: a suspended generator's frame holds its
    last reply, and the buffers that reply views, until the next one; a stream's objects
    are walked by every full garbage collection (http_generate.EventRelay)."""

    __slots__ = (
        "_backend",
        "_call",
        "_convert",
        "_final",
        "_messages",
        "_metadata",
        "_started",
        "_timeouts",
        "_wire",
    )

    def __init__(
        self,
        backend: Backend,
        wire: bytes,
        timeouts: Timeouts,
        metadata: Metadata,
        convert: Callable[[Any], Any] | None = None,
    ) -> None:
        self._backend = backend
        self._wire = wire + _ASK_EMPTY_FINAL
        self._timeouts = timeouts
        self._metadata = metadata
        self._convert = convert
        self._call: StreamCall | None = None  # opened by the first read
        self._messages: AsyncIterator[bytes] | None = None
        self._started = False  # a response has arrived: the idle timeout applies
        self._final = False  # the response marked final has arrived

    def __aiter__(self) -> StreamReplies:
        return self

    async def __anext__(self) -> Any:
        if self._call is None:
            timeouts = self._timeouts
            self._call = await self._backend.channel.stream(
                self._wire, timeouts.total, self._metadata
            )
            self._messages = aiter(self._call)
            self._wire = b""  # the call has sent it
        if self._final:
            raise StopAsyncIteration
        assert self._messages is not None
        try:
            while True:
                try:
                    # Before the first reply only the call's deadline bounds the wait (and
                    # an asyncio.timeout costs ~5 µs on the way to it).
                    idle = self._timeouts.idle
                    async with asyncio.timeout(idle) if self._started else _NO_TIMEOUT:
                        message = await anext(self._messages)
                except TimeoutError:
                    raise UpstreamStalled(
                        f"upstream stream stalled: no response from backend "
                        f"{self._backend.id} for {idle:g} s"
                    ) from None
                error, reply = decode_reply(grpc_wire.decode_stream_response, message)
                if error:
                    if error.startswith(TRITON_UNKNOWN_MODEL):
                        raise ModelGone(error)
                    raise UpstreamError(error, 400)
                if reply is None:
                    continue
                self._final = reply.parameters.get("triton_final_response") is True
                if reply.outputs:
                    self._started = True
                    return reply if self._convert is None else self._convert(reply)
                if self._final:
                    raise StopAsyncIteration
        except BaseException:  # the end, a failure, a hang-up
            if not self._final:  # at the call's own end, cancelling is a no-op
                self._call.cancel()
            raise

    async def aclose(self) -> None:
        if self._call is not None and not self._final:
            self._call.cancel()


async def open_stream(
    lease: Lease, replies_for: Callable[[Backend, float], Replies[T]], timeout: float
) -> tuple[T, StreamRest[T]]:
    """Start a stream (``replies_for`` a backend and what is left of the deadline) with
    failover until its first reply (nothing has reached the client before it), within
    the request's ``timeout``: each attempt's stream carries what is left of it (an HTTP
    stream its own timer, a gRPC call its deadline), so waiting needs no timer of its
    own (``asyncio.timeout`` costs ~5 µs, on the way to the first token). Returns that
    reply and the rest; the caller must ``aclose`` the rest, which ends the upstream call."""

    async def first_reply(backend: Backend, left: float) -> tuple[T, Replies[T]]:
        replies = replies_for(backend, left)
        try:
            return await anext(replies), replies
        except StopAsyncIteration:
            raise UpstreamError("the model ended the stream without a response", 502) from None
        except BaseException:
            await replies.aclose()
            raise

    first, rest = await with_failover(lease, first_reply, timeout)
    return first, StreamRest(lease, rest)


class StreamRest(Generic[T]):
    """The rest of a stream after its first reply. A backend failure from here on
    still counts against the backend (outlier ejection), though nothing can be retried.
    ``aclose`` ends the upstream replies whether or not they were iterated: the fast
    lane relays an HTTP stream from its connection and never iterates them."""

    def __init__(self, lease: Lease, replies: Replies[T]) -> None:
        self._lease = lease
        self._replies = replies

    def __aiter__(self) -> StreamRest[T]:
        return self

    async def __anext__(self) -> T:
        try:
            reply = await anext(self._replies)
        except grpc.aio.AioRpcError as exc:
            if is_connection_failure(exc):
                self._lease.backend_failed()
            raise
        except (UpstreamStalled, UpstreamConnectionError):
            self._lease.backend_failed()
            raise
        self._lease.token()
        return reply

    async def aclose(self) -> None:
        await self._replies.aclose()
