"""Triton's ``generate_stream`` over HTTP: its Server-Sent Events, passed on as they are.

Why not gRPC ModelStreamInfer here: measured on this machine, a token through
``grpc.aio`` cost ~600 CPU-µs on the event loop's thread plus ~250 in gRPC's own
threads (bench/README.md); an event read off a plain socket and written on costs a few
tens. A stream has a connection to itself while it runs, so hanging up is closing it:
Triton notices on its next write and cancels the request (it cannot notice earlier, see
triton-inference-server/server#7077). A stream that Triton ended cleanly leaves its
connection idle in its backend's ``StreamPool`` for the next stream (a fresh connection
costs Triton ~0.2 ms of time to first token, measured here); any other ends it.

One timer per stream keeps both its deadline and its idle timeout: it is moved only
when it fires, so an event costs a clock read, not a timer reschedule (and a stream
holds one timer's objects, not two, for the garbage collector to walk). ``relay`` hands
events over from the connection's own callback, so a relayed token wakes no task at all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast

from fastpath.http1 import parse_reply_head

from .errors import GatewayTimeout, UpstreamStalled
from .http1 import post_head
from .http_upstream import HttpEndpoint, UpstreamConnectionError

_MAX_HEAD_BYTES = 64 * 1024
# Idle connections kept per backend; more streams than this at once close theirs at the end.
MAX_IDLE_STREAM_CONNECTIONS = 16

# _chunk_left's states besides the bytes left of a chunk's data.
_SIZE_LINE = -1  # a chunk's size line is next
_CHUNK_END = -2  # a chunk's CRLF is next
_TRAILERS = -3  # the last chunk was read: trailer lines up to an empty one


class StreamRefused(Exception):
    """Triton answered the request with an error instead of a stream."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


class _IdleConnection(asyncio.Protocol):
    """A pooled connection between two streams: Triton sends nothing then, so any byte
    or a close ends it (and takes it out of the pool)."""

    def __init__(self, pool: StreamPool, transport: asyncio.Transport) -> None:
        self._pool = pool
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.forget(self)


class StreamPool:
    """Connections to one Triton HTTP endpoint for ``generate_stream``: a stream gets an
    idle one when there is one (LIFO: the freshest), else a new one, and gives it back
    only if it read its reply to the end (``SseStream.close``). At most
    ``max_idle`` wait idle."""

    def __init__(self, target: str, max_idle: int = MAX_IDLE_STREAM_CONNECTIONS) -> None:
        self.endpoint = HttpEndpoint(target)
        self._max_idle = max_idle
        self._idle: list[_IdleConnection] = []

    async def open(
        self,
        label: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        idle: float,
        deadline: float,
    ) -> SseStream:
        """POST ``body`` to ``path`` and return the stream once its request is sent;
        ``head()`` then waits for Triton's answer."""
        stream = SseStream(label, idle, deadline, self)
        stream.request = (post_head(self.endpoint.host_header, path, headers, len(body)), body)
        while self._idle:
            connection = self._idle.pop()
            transport = connection.transport
            if not transport.is_closing():
                transport.set_protocol(stream)
                stream.reused = True
                stream.connection_made(transport)
                stream.send_request()
                return stream
        await self.connect(stream)
        return stream

    async def connect(self, stream: SseStream) -> None:
        """A new connection for ``stream``, its request sent."""
        try:
            await self.endpoint.connect(lambda: stream)
        except BaseException:  # unreachable or cancelled: the stream's timers go with it
            stream.close()
            raise
        stream.send_request()

    def give_back(self, transport: asyncio.Transport) -> None:
        """Keep ``transport`` (its last reply read to the end) for the next stream."""
        if len(self._idle) >= self._max_idle or transport.is_closing():
            transport.close()
            return
        connection = _IdleConnection(self, transport)
        transport.set_protocol(connection)
        self._idle.append(connection)

    def forget(self, connection: _IdleConnection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Close the idle connections (streams under way keep theirs)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.transport.close()


class SseStream(asyncio.Protocol):
    """One ``generate_stream`` reply: complete events (``data: ...\\n\\n``) in order."""

    def __init__(self, label: str, idle: float, deadline: float, pool: StreamPool) -> None:
        # Kept: on CPython 3.11 each asyncio.get_running_loop() is a getpid() system call
        # (one per relayed token, before).
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._label = label  # names the backend in a stall's message
        self._idle = idle
        self._pool = pool
        self.request: tuple[bytes, bytes] | None = None  # head and body, until answered
        self.reused = False  # on a pooled connection: may be stale, retried once if so
        self._received = False  # any reply byte
        self._buffer = bytearray()  # received, not yet de-chunked
        self._text = bytearray()  # de-chunked, not yet a whole event
        self._events: deque[bytes] = deque()
        self._head: tuple[int, dict[bytes, bytes]] | None = None
        self._keep_alive = False  # the reply's head lets the connection serve another
        self._length = -1  # a Content-Length body (an error reply); -1: chunked
        self._chunk_left = _SIZE_LINE  # bytes left of the current chunk, or a state
        self._finished = False  # the reply's last event is in (or the stream was closed)
        self._complete = False  # the reply was read to its last byte
        self._closed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last_event = 0.0  # loop time; 0: no event yet, no idle timeout yet
        self._idle_timed = False  # the idle timeout applies (from the first wait after an event)
        self._on_event: Callable[[bytes], None] | None = None  # set by relay
        self._relayed: asyncio.Future[None] | None = None
        # The request's deadline (loop time) cuts the stream as a gRPC deadline would.
        # The timer is set once the request is sent (Triton has work then, the gateway
        # has none), for the deadline, and later for the idle timeout if that is sooner.
        self._deadline_at = deadline
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._finished:
            self._fail(UpstreamConnectionError(f"connection lost: {exc or 'closed'}"))

    def data_received(self, data: bytes) -> None:
        self._received = True
        if (
            self._chunk_left == _SIZE_LINE
            and self._head is not None
            and self._length < 0
            and not self._buffer
            and not self._text
        ):
            taken = self._whole_events(data)
            if taken == len(data):
                if self._on_event is not None:
                    self._deliver()
                else:
                    self._wake()
                return
            data = data[taken:]
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

    def send_request(self) -> None:
        assert self.transport is not None and self.request is not None
        self.transport.writelines(self.request)
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline_at, self._check_time)

    # -- parsing -------------------------------------------------------------------------------

    def _read_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD_BYTES:
                raise ValueError("reply head too large")
            return False
        head = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        self._take_head(head)
        return True

    def _take_head(self, head: bytes) -> None:
        self._head = parse_reply_head(head)
        self.request = None  # answered: never sent again
        headers = self._head[1]
        self._keep_alive = (
            head.startswith(b"HTTP/1.1 ") and headers.get(b"connection", b"").lower() != b"close"
        )
        if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
            self._length = int(headers.get(b"content-length", b"0"))

    def _whole_events(self, data: bytes) -> int:
        """The usual read, a token's chunk holding one whole event, without copies
        through the buffers: takes the events of the whole such chunks ``data`` starts
        with and returns where they end (the general path reads the rest)."""
        taken = 0
        end = data.find(b"\r\n")
        while end > 0:
            try:
                size = int(data[taken:end], 16)
            except ValueError:  # an extension, or not a size: the general path decides
                return taken
            start = end + 2
            stop = start + size
            if size < 2 or data.find(b"\n\n", start, stop) != stop - 2:
                return taken  # the last chunk, or not one whole event
            if data[stop : stop + 2] != b"\r\n":
                return taken
            self._events.append(data[start:stop])
            taken = stop + 2
            end = data.find(b"\r\n", taken)
        return taken

    def _dechunk(self) -> None:
        buffer = self._buffer
        while True:
            if self._chunk_left == _CHUNK_END:  # a chunk's data is done: its CRLF is next
                if len(buffer) < 2:
                    return
                del buffer[:2]
                self._chunk_left = _SIZE_LINE
            if self._chunk_left < 0:  # a size line, or after the last chunk a trailer line
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                if self._chunk_left == _TRAILERS:
                    del buffer[: end + 2]
                    if end == 0:  # the empty line: the reply's last byte
                        self._complete = True
                        return
                    continue
                size = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
                if size < 0:
                    raise ValueError(f"negative chunk size {size}")
                del buffer[: end + 2]
                if size == 0:
                    self._finished = True
                    self._chunk_left = _TRAILERS
                    continue
                self._chunk_left = size
            take = min(self._chunk_left, len(buffer))
            self._text += buffer[:take]
            del buffer[:take]
            self._chunk_left -= take
            if self._chunk_left:
                return
            self._chunk_left = _CHUNK_END

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
        self._relayed = self._loop.create_future()
        if self._error is not None:
            self._relayed.set_exception(self._error)
        else:
            if self._last_event and not self._idle_timed:
                self._time_idle()
            self._deliver()
        return self._relayed

    def _deliver(self) -> None:
        assert self._on_event is not None and self._relayed is not None
        if self._relayed.done():
            return
        if self._events:
            self._last_event = self._loop.time()
            if not self._idle_timed:
                self._time_idle()
            try:
                while self._events and not self._relayed.done():  # on_event may close
                    self._on_event(self._events.popleft())
            except Exception as exc:  # a malformed event: the stream cannot go on
                self._fail(UpstreamConnectionError(f"unusable event from Triton: {exc!r}"))
                return
        if self._finished and not self._relayed.done():
            self._relayed.set_result(None)

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        """The reply's status and headers; StreamRefused (with the body) unless 200.
        A pooled connection that Triton had closed (it fails before any reply byte)
        is replaced by a new one, once."""
        while self._head is None or (
            (self._length >= 0 or self._head[0] != 200) and not self._finished
        ):
            try:
                await self._wait()
            except UpstreamConnectionError:
                if not (self.reused and not self._received and not self._closed):
                    raise
                self.reused = False
                self._error = None
                await self._pool.connect(self)
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
        self._last_event = self._loop.time()
        return self._events.popleft()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        if self._last_event and not self._idle_timed:
            # The idle timeout runs from the first event, its timing from the first wait
            # after it: the first event goes on to the client before the timer moves.
            self._time_idle()
        self._waiter = self._loop.create_future()
        await self._waiter
        self._waiter = None
        if self._error is not None:
            raise self._error

    def _time_idle(self) -> None:
        """From now on the idle timeout applies too: the timer moves up if it is sooner."""
        self._idle_timed = True
        loop = self._loop
        expires = loop.time() + self._idle
        if expires < self._deadline_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(expires, self._check_time)

    def _check_time(self) -> None:
        loop = self._loop
        now = loop.time()
        if now >= self._deadline_at:
            self._fail(GatewayTimeout("request deadline exceeded"))
            return
        if self._idle_timed and now - self._last_event >= self._idle:
            self._fail(
                UpstreamStalled(
                    f"upstream stream stalled: no response from backend {self._label} "
                    f"for {self._idle:g} s"
                )
            )
            return
        # Early (timers are rounded to milliseconds), or events came: the next expiry.
        expires = self._deadline_at
        if self._idle_timed:
            expires = min(expires, self._last_event + self._idle)
        self._timer = loop.call_at(expires, self._check_time)

    def close(self) -> None:
        """End the stream. Read to its end, its connection goes back to the pool;
        otherwise (abandoned, failed) it is closed: Triton then cancels the request."""
        if self._closed:
            return
        self._closed = True
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
        if self._relayed is not None and not self._relayed.done():
            self._relayed.set_result(None)
        transport = self.transport
        if transport is None:
            return
        if self._complete and self._keep_alive and self._error is None and not self._buffer:
            self._pool.give_back(transport)
        else:
            transport.close()
