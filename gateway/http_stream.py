"""Triton's ``generate_stream`` over HTTP: its Server-Sent Events, passed on as they are.

Why not gRPC ModelStreamInfer here: measured on this machine, a token through
``grpc.aio`` cost ~600 CPU-µs on the event loop's thread plus ~250 in gRPC's own
threads (bench/README.md); an event read off a plain socket and written on costs a few
tens. Each stream has its own connection, so hanging up is closing it: Triton notices
on its next write and cancels the request (it cannot notice earlier, see
triton-inference-server/server#7077).

One timer per stream keeps the idle timeout: it is moved only when it fires, so an
event costs a clock read, not a timer reschedule. ``relay`` hands events over from the
connection's own callback, so a relayed token wakes no task at all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast

from .errors import GatewayTimeout, UpstreamStalled
from .http_upstream import UpstreamConnectFailed, UpstreamConnectionError, parse_reply_head

_MAX_HEAD_BYTES = 64 * 1024


class StreamRefused(Exception):
    """Triton answered the request with an error instead of a stream."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


class SseStream(asyncio.Protocol):
    """One ``generate_stream`` reply: complete events (``data: ...\\n\\n``) in order."""

    def __init__(self, label: str, idle: float, deadline: float) -> None:
        self.transport: asyncio.Transport | None = None
        self._label = label  # names the backend in a stall's message
        self._idle = idle
        self._buffer = bytearray()  # received, not yet de-chunked
        self._text = bytearray()  # de-chunked, not yet a whole event
        self._events: deque[bytes] = deque()
        self._head: tuple[int, dict[bytes, bytes]] | None = None
        self._length = -1  # a Content-Length body (an error reply); -1: chunked
        # Bytes left of the current chunk; -1: a size line is next, -2: a chunk's CRLF.
        self._chunk_left = -1
        self._finished = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last_event = 0.0  # loop time; 0: no event yet, no idle timeout yet
        self._idle_timer: asyncio.TimerHandle | None = None
        self._on_event: Callable[[bytes], None] | None = None  # set by relay
        self._relayed: asyncio.Future[None] | None = None
        # The request's deadline (loop time) cuts the stream as a gRPC deadline would.
        self._deadline_timer = asyncio.get_running_loop().call_at(deadline, self._deadline)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._finished:
            self._fail(UpstreamConnectionError(f"connection lost: {exc or 'closed'}"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            if self._head is None and not self._read_head():
                return
            if self._length >= 0:
                if len(self._buffer) >= self._length:
                    self._finished = True
            else:
                self._dechunk()
                self._split_events()
        except ValueError as exc:
            self._fail(UpstreamConnectionError(f"malformed stream from Triton: {exc}"))
            return
        if self._on_event is not None:
            self._deliver()
        else:
            self._wake()

    # -- parsing -------------------------------------------------------------------------------

    def _read_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD_BYTES:
                raise ValueError("reply head too large")
            return False
        self._head = parse_reply_head(bytes(self._buffer[:end]))
        del self._buffer[: end + 4]
        headers = self._head[1]
        if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
            self._length = int(headers.get(b"content-length", b"0"))
        return True

    def _dechunk(self) -> None:
        buffer = self._buffer
        while not self._finished:
            if self._chunk_left == -2:  # a chunk's data is done: its CRLF comes next
                if len(buffer) < 2:
                    return
                del buffer[:2]
                self._chunk_left = -1
            if self._chunk_left == -1:
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
                if size < 0:
                    raise ValueError(f"negative chunk size {size}")
                del buffer[: end + 2]
                if size == 0:
                    self._finished = True  # trailers, if any, are not needed
                    return
                self._chunk_left = size
            take = min(self._chunk_left, len(buffer))
            self._text += buffer[:take]
            del buffer[:take]
            self._chunk_left -= take
            if self._chunk_left:
                return
            self._chunk_left = -2

    def _split_events(self) -> None:
        text = self._text
        start = 0
        while (end := text.find(b"\n\n", start)) >= 0:
            self._events.append(bytes(text[start : end + 2]))
            start = end + 2
        if start:
            del text[:start]

    # -- waiting ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._relayed is not None and not self._relayed.done():
            self._relayed.set_exception(self._error)
        self._wake()

    def relay(self, on_event: Callable[[bytes], None]) -> asyncio.Future[None]:
        """From now on, hand each event to ``on_event`` as it arrives, from the
        connection's callback; the future ends with the stream (or its failure)."""
        self._on_event = on_event
        self._relayed = asyncio.get_running_loop().create_future()
        if self._error is not None:
            self._relayed.set_exception(self._error)
        else:
            self._deliver()
        return self._relayed

    def _deliver(self) -> None:
        assert self._on_event is not None and self._relayed is not None
        if self._relayed.done():
            return
        if self._events:
            self._last_event = asyncio.get_running_loop().time()
            try:
                while self._events and not self._relayed.done():  # on_event may close
                    self._on_event(self._events.popleft())
            except Exception as exc:  # a malformed event: the stream cannot go on
                self._fail(UpstreamConnectionError(f"unusable event from Triton: {exc!r}"))
                return
        if self._finished and not self._relayed.done():
            self._relayed.set_result(None)

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        """The reply's status and headers; StreamRefused (with the body) unless 200."""
        while self._head is None or (
            (self._length >= 0 or self._head[0] != 200) and not self._finished
        ):
            await self._wait()
        status, headers = self._head
        if status != 200:
            # Triton words a refusal as JSON, or (a chunked reply) as one error event.
            if self._length >= 0:
                raise StreamRefused(status, bytes(self._buffer[: self._length]))
            raise StreamRefused(status, b"".join(self._events) + self._text)
        return status, headers

    async def next_event(self) -> bytes | None:
        """The next event, None at the end of the stream."""
        while not self._events:
            if self._finished:
                return None
            await self._wait()
        if not self._last_event:
            self._arm_idle_timer()
        self._last_event = asyncio.get_running_loop().time()
        return self._events.popleft()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter
        self._waiter = None
        if self._error is not None:
            raise self._error

    def _arm_idle_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_at(loop.time() + self._idle, self._check_idle)

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_event < self._idle:
            self._idle_timer = loop.call_at(self._last_event + self._idle, self._check_idle)
            return
        self._fail(
            UpstreamStalled(
                f"upstream stream stalled: no response from backend {self._label} "
                f"for {self._idle:g} s"
            )
        )

    def _deadline(self) -> None:
        self._fail(GatewayTimeout("request deadline exceeded"))

    def close(self) -> None:
        """End the stream (at its end, or abandoned: Triton then cancels the request)."""
        self._finished = True
        self._deadline_timer.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._relayed is not None and not self._relayed.done():
            self._relayed.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def open_sse_stream(
    target: str,
    label: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    idle: float,
    deadline: float,
) -> SseStream:
    """Connect to ``target`` (``host:port``), POST ``body`` to ``path`` and return the
    stream once its request is sent; ``head()`` then waits for Triton's answer."""
    host, _, port = target.rpartition(":")
    loop = asyncio.get_running_loop()
    try:
        _, stream = await loop.create_connection(
            lambda: SseStream(label, idle, deadline), host, int(port)
        )
    except OSError as exc:
        raise UpstreamConnectFailed(f"cannot connect to {target}: {exc}") from None
    lines = [f"POST {path} HTTP/1.1", f"Host: {target}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    assert stream.transport is not None
    stream.transport.writelines((("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body))
    return stream
