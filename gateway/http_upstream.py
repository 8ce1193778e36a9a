"""Unary infer forwarded to Triton's HTTP endpoint over pooled keep-alive HTTP/1.1.

A KServe request body (JSON or binary extension) means the same thing to Triton's
HTTP endpoint as to the gateway, so it is forwarded untouched, and so is the reply:
no parsing of tensors, no re-framing, one write of our request head plus the body the
client sent. Measured here, this costs ~50 CPU-µs per request against ~330 for a
grpc.aio unary call (bench/README.md), which is why unary infer, JSON or binary, takes
this path when a backend's HTTP endpoint is known; streaming stays on gRPC
ModelStreamInfer.

Only what Triton's HTTP server sends is supported: replies with Content-Length.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from fastpath.http1 import parse_reply_head

from .http1 import post_head, receive_in_place

# Request headers that change what Triton does with the body, forwarded as they are.
# (Not Content-Encoding: aiohttp has already decompressed the body it hands over.)
# Not Content-Type: the caller names the body's kind itself (Triton's HTTP server drops
# the connection on a form content type, which curl sends by default).
# Not Accept-Encoding: a compressed reply could not have the invalid UTF-8 that Triton
# writes into JSON replaced (kserve._passthrough), so replies come uncompressed, as the
# gateway's own answers do.
FORWARDED_REQUEST_HEADERS = (
    "Inference-Header-Content-Length",
    "traceparent",
    "tracestate",
)
# Trace context is the gateway's own span's, not the client's (see telemetry).
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
# Reply headers the client needs to read the body.
FORWARDED_REPLY_HEADERS = (b"content-type", b"inference-header-content-length", b"content-encoding")
_MAX_HEAD_BYTES = 64 * 1024


class UpstreamConnectionError(ConnectionError):
    """The connection failed before a whole reply arrived (safe to try another backend
    only if nothing was sent to the client, which is always so for a unary call)."""


class UpstreamConnectFailed(UpstreamConnectionError):
    """No connection could be made: the backend is not there (unlike a connection lost
    mid-exchange, which one request can cause)."""


@dataclass(slots=True)
class HttpReply:
    status: int
    headers: dict[bytes, bytes]  # lower-case names
    body: bytes | bytearray  # a large body is the buffer it was received into


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time (no pipelining)."""

    def __init__(self) -> None:
        # Kept: on CPython 3.11 each asyncio.get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[HttpReply] | None = None
        self._head: tuple[int, dict[bytes, bytes]] | None = None
        self._length = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(
                UpstreamConnectionError(f"connection lost: {exc or 'closed'}")
            )

    def data_received(self, data: bytes) -> None:
        if not self._buffer and self._head is None and self._whole(data):
            return
        self._buffer += data
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > _MAX_HEAD_BYTES:
                    self._fail("reply head too large")
                return
            try:
                self._head = parse_reply_head(bytes(self._buffer[:end]))
                self._length = int(self._head[1][b"content-length"])
            except (ValueError, KeyError, IndexError) as exc:
                self._fail(f"unsupported reply from Triton: {exc!r}")
                return
            del self._buffer[: end + 4]
            assert self.transport is not None
            if receive_in_place(self, self.transport, self._length, self._buffer, self._reply):
                return
        if len(self._buffer) >= self._length:
            with memoryview(self._buffer) as view:  # one copy of the body, not two
                body = bytes(view[: self._length])
            del self._buffer[: self._length]
            self._reply(body)

    def _whole(self, data: bytes) -> bool:
        """A whole small reply in one read (the usual case): answered from ``data``
        without the buffer's copies; False leaves ``data`` to the general path."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        try:
            head = parse_reply_head(data[:end])
            length = int(head[1][b"content-length"])
        except (ValueError, KeyError):
            return False  # the general path says what is wrong
        if len(data) != end + 4 + length:
            return False
        self._head = head
        self._reply(data[end + 4 :])
        return True

    def _reply(self, body: bytes | bytearray) -> None:
        assert self._head is not None
        status, headers = self._head
        self._head = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(HttpReply(status, headers, body))

    def _fail(self, reason: str) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(UpstreamConnectionError(reason))
        self.close()

    def expect_reply(self) -> asyncio.Future[HttpReply]:
        """The future of the reply to the request about to be written."""
        self._waiter = self.loop.create_future()
        return self._waiter

    def write(self, head: bytes, body: bytes | bytearray) -> None:
        assert self.transport is not None
        self.transport.writelines((head, body))

    def time_out(self) -> None:
        """The exchange's deadline passed: TimeoutError for its caller, and the
        connection, whose state is now unknown, closes."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(TimeoutError())
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


P = TypeVar("P", bound=asyncio.Protocol)


class HttpEndpoint:
    """A Triton HTTP endpoint, ``host:port``: its Host header, and new connections to it
    (one place that says what an unreachable backend is, for both pools)."""

    __slots__ = ("host", "host_header", "port", "target")

    def __init__(self, target: str) -> None:
        self.target = target
        host, _, port = target.rpartition(":")
        self.host = host
        self.port = int(port)
        self.host_header = target.encode()

    async def connect(self, protocol_factory: Callable[[], P]) -> P:
        """A new connection; a refused or unreachable one is ``UpstreamConnectFailed``."""
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(protocol_factory, self.host, self.port)
        except OSError as exc:
            raise UpstreamConnectFailed(f"cannot connect to {self.target}: {exc}") from None
        return protocol


class HttpPool:
    """Keep-alive connections to one Triton HTTP endpoint, at most ``max_connections``
    (requests beyond wait; admission bounds how many can wait).

    The requests of one event-loop iteration are written together at its end, not each
    as it starts. Triton's dynamic batcher batches what is queued when its model
    instance frees up, and a request's start takes the gateway ~150 µs. Written as they
    started, concurrent requests reached Triton one at a time and were batched less than
    a direct client's. Measured on ``embed`` at concurrency 32 with ``--workers 1``, the
    mean batch went from 1.13–1.18 to 1.52 (direct: 1.57), Triton's CPU per request from
    284–293 to 242 µs, and the gateway's rate from 70% to 79% of direct. A lone request
    waits one loop iteration more, which did not show at concurrency 1 (bench/README.md).
    """

    def __init__(self, target: str, max_connections: int = 64) -> None:
        self.endpoint = HttpEndpoint(target)
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        # Exchanges under way and their deadlines (loop time), watched by one timer set
        # for the earliest and left set across exchanges, instead of a timer per
        # exchange: with uvloop, arming and cancelling one costs ~5 µs, asyncio.timeout
        # twice that, per request.
        self._deadlines: dict[_Connection, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._unwritten: list[tuple[_Connection, bytes, bytes | bytearray]] = []

    async def post(
        self, path: str, headers: Sequence[tuple[str, str]], body: bytes | bytearray, timeout: float
    ) -> HttpReply:
        head = post_head(self.endpoint.host_header, path, headers, len(body))
        async with self._slots:
            reused = self._idle_connection()
            if reused is not None:
                try:
                    return await self._exchange(reused, head, body, timeout)
                except UpstreamConnectionError:
                    pass  # Triton closed an idle keep-alive connection: use a fresh one
            connection = await self.endpoint.connect(_Connection)
            return await self._exchange(connection, head, body, timeout)

    def _idle_connection(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _exchange(
        self, connection: _Connection, head: bytes, body: bytes | bytearray, timeout: float
    ) -> HttpReply:
        loop = connection.loop
        deadline = loop.time() + timeout
        self._deadlines[connection] = deadline
        if self._timer is None or deadline < self._timer_at:
            self._set_timer(loop, deadline)
        reply_coming = connection.expect_reply()
        if not self._unwritten:
            loop.call_soon(self._write_all)
        self._unwritten.append((connection, head, body))
        try:
            reply = await reply_coming
        except BaseException:
            # Cancelled or timed out mid-exchange: the connection's state is unknown.
            connection.close()
            raise
        finally:
            del self._deadlines[connection]
        if reply.headers.get(b"connection", b"").lower() == b"close":
            connection.close()
        else:
            self._idle.append(connection)
        return reply

    def _write_all(self) -> None:
        """This iteration's requests, in the order they started; a connection closed
        since (its exchange cancelled, timed out or lost) has nothing to send."""
        unwritten, self._unwritten = self._unwritten, []
        for connection, head, body in unwritten:
            if not connection.closed:
                connection.write(head, body)

    def _set_timer(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._expire)
        self._timer_at = when

    def _expire(self) -> None:
        """Time out the exchanges past their deadline; set the timer for the next one."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for connection, deadline in list(self._deadlines.items()):
            if deadline <= now:
                connection.time_out()
        pending = [d for d in self._deadlines.values() if d > now]
        if pending:
            self._set_timer(loop, min(pending))

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
