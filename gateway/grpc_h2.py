"""Triton's hot gRPC calls (ModelInfer, ModelStreamInfer) over HTTP/2 connections that
the event loop runs itself.

grpc.aio runs every call on its own threads and hands each event to the event loop
across threads: ~15 futex wake-ups and ~2 ms of the loop thread's CPU per
ModelStreamInfer call through the gateway on this machine (bench/README.md). Here the
connection's ``data_received`` callback reads the HTTP/2 frames (the client's own
framing: the ``h2`` library's state machine cost more than the rest of the call; the
``hpack`` library decodes Triton's header blocks) and hands a call's messages to the
task that waits for them; nothing crosses a thread.

A failed call raises ``grpc.aio.AioRpcError`` with the code grpc.aio gives for the same
failure (UNAVAILABLE when Triton could not be reached or the connection broke,
DEADLINE_EXCEEDED, CANCELLED, or Triton's own status), so callers handle both alike.
Plaintext only: a TLS backend keeps grpc.aio (gateway/upstream.py).
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections import deque
from collections.abc import Iterable, Sequence
from typing import cast
from urllib.parse import unquote

import grpc
import hpack

_StatusCode = grpc.StatusCode
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# gRPC's mapping of an HTTP status that came without a gRPC status (a proxy's answer).
_HTTP_CODES = {
    400: _StatusCode.INTERNAL,
    401: _StatusCode.UNAUTHENTICATED,
    403: _StatusCode.PERMISSION_DENIED,
    404: _StatusCode.UNIMPLEMENTED,
    429: _StatusCode.UNAVAILABLE,
    502: _StatusCode.UNAVAILABLE,
    503: _StatusCode.UNAVAILABLE,
    504: _StatusCode.UNAVAILABLE,
}
_WINDOW = 1 << 24  # receive window, per stream and per connection: a 4 MiB reply in one go
_PREFIX = 5  # a gRPC message's frame: compressed flag, 4-byte big-endian length
_ALL_SENT = memoryview(b"")  # a call's request once all of it is sent
CONNECT_TIMEOUT_S = 10.0  # to open a connection and have Triton's SETTINGS (grpc's is 20 s)

Metadata = Sequence[tuple[str, str]]


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def grpc_timeout(seconds: float) -> bytes:
    """The ``grpc-timeout`` header's value: at most 8 digits, in milliseconds while
    they fit (rounded up, so Triton never gives up before the gateway does)."""
    millis = max(1, math.ceil(seconds * 1000))
    if millis < 100_000_000:
        return b"%dm" % millis
    return b"%dS" % min(math.ceil(seconds), 99_999_999)


class H2Call:
    """One call: its request is sent as the connection's windows allow, its reply
    messages (serialized protobuf) are read with ``async for``; ``cancel`` resets the
    stream, which makes Triton cancel the request."""

    __slots__ = (
        "_connection",
        "_details",
        "_ended",
        "_error",
        "_http_status",
        "_messages",
        "_partial",
        "_send_window",
        "_status",
        "_stream_id",
        "_timer",
        "_unacknowledged",
        "_unsent",
        "_waiter",
    )  # fmt: skip

    def __init__(
        self, connection: _Connection, stream_id: int, message: bytes, send_window: int
    ) -> None:
        self._connection = connection
        self._stream_id = stream_id
        # Flow control: what Triton lets this stream send, and what it has read and not
        # yet given back with a WINDOW_UPDATE.
        self._send_window = send_window
        self._unacknowledged = 0
        # The message's prefix as one 5-byte number: a zero "compressed" flag, its length.
        self._unsent = memoryview(len(message).to_bytes(_PREFIX, "big") + message)
        self._messages: deque[bytes] = deque()
        self._partial = b""
        self._error: grpc.aio.AioRpcError | None = None
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._http_status = 0
        self._status: int | None = None
        self._details = ""

    def __aiter__(self) -> H2Call:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._messages:
                return self._messages.popleft()
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def reply(self) -> bytes:
        """The one reply of a unary call; the call is cancelled if the wait is."""
        reply = None
        try:
            async for message in self:
                reply = message
        finally:
            self.cancel()
        if reply is None:
            raise rpc_error(_StatusCode.INTERNAL, "the server sent no response message")
        return reply

    def cancel(self) -> bool:
        """Stop the call (Triton cancels the request); False if it had ended."""
        if self._ended:
            return False
        self._stop(_StatusCode.CANCELLED, "Locally cancelled by application!")
        return True

    def expire(self) -> None:
        self._stop(_StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _stop(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with ``code`` and reset its stream (Triton cancels it)."""
        if not self._ended:
            self._connection.reset(self._stream_id)
            self._end(rpc_error(code, details))

    # -- from the connection's callbacks ----------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self, error: grpc.aio.AioRpcError | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        if self._timer is not None:
            self._timer.cancel()
        self._connection.forget(self._stream_id)
        self._wake()

    def _data(self, data: bytes, limit: int) -> None:
        buffer = self._partial + data if self._partial else data
        start, end = 0, len(buffer)
        while end - start >= _PREFIX:
            size = int.from_bytes(buffer[start + 1 : start + _PREFIX], "big")
            if size > limit:
                self._stop(
                    _StatusCode.RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({size} vs. {limit})",
                )
                return
            if end - start < _PREFIX + size:
                break
            start += _PREFIX
            self._messages.append(buffer[start : start + size])
            start += size
        self._partial = buffer[start:]
        if self._messages:
            self._wake()

    def _headers(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        for name, value in headers:
            if name == b"grpc-status":
                self._status = int(value)
            elif name == b"grpc-message":
                self._details = unquote(value.decode("utf-8", "replace"))
            elif name == b":status":
                self._http_status = int(value)

    def _finished(self) -> None:
        """The server ended the stream: its trailers say how the call went."""
        status = self._status
        if status is None:
            code = _HTTP_CODES.get(self._http_status, _StatusCode.UNKNOWN)
            details = f"Triton ended the stream without a gRPC status (HTTP {self._http_status})"
            self._end(rpc_error(code, details))
        elif status == 0:
            self._end(None)
        else:
            self._end(rpc_error(_CODES.get(status, _StatusCode.UNKNOWN), self._details))


# HTTP/2 (RFC 9113): frame types, flags, settings and error codes the client uses.
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY = 0, 1, 3, 4, 5, 6, 7
_WINDOW_UPDATE, _CONTINUATION = 8, 9
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_HEADER_TABLE_SIZE, _ENABLE_PUSH, _MAX_STREAMS, _INITIAL_WINDOW, _MAX_FRAME = 1, 2, 3, 4, 5
_REFUSED_STREAM, _CANCEL = 0x7, 0x8
# A stream reset by Triton: REFUSED_STREAM means it never started (safe to retry).
_RESET_CODES = {_REFUSED_STREAM: _StatusCode.UNAVAILABLE, _CANCEL: _StatusCode.CANCELLED}
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DEFAULT_WINDOW = 65_535
_MAX_STREAM_ID = 2**31 - 1
# What the client asks of Triton: no pushes, a window that takes a 4 MiB reply in one
# go, and frames up to 1 MiB (fewer frames to parse for a large reply).
_FRAME_LIMIT = 1 << 20
_SETTINGS_SENT = ((_ENABLE_PUSH, 0), (_INITIAL_WINDOW, _WINDOW), (_MAX_FRAME, _FRAME_LIMIT))


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def _hpack_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541, 5.1) with an N-bit prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class HeaderDecoder:
    """An HPACK decoder that remembers blocks of indexed fields only.

    In steady state each of Triton's replies is two such blocks, the response's headers
    and then its trailers (bytes 88 c0 bf, then be: every field from the tables), which
    the ``hpack`` library decodes in ~2.5 µs each. A block of indexed fields
    changes no table, so it means the same until a block that may change the dynamic
    table (a literal, a size update) is decoded; that one clears what was remembered."""

    def __init__(self, remembered: int = 64) -> None:
        self._decoder = hpack.Decoder()
        self._decoded: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._remembered = remembered

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        remembered = self._decoded.get(block)
        if remembered is not None:
            return remembered
        # A list of (name, value) pairs, as bytes when raw.
        headers = cast(list[tuple[bytes, bytes]], self._decoder.decode(block, raw=True))
        if not _only_indexed(block):
            self._decoded.clear()
        elif len(self._decoded) < self._remembered:
            self._decoded[block] = headers
        return headers


def _only_indexed(block: bytes) -> bool:
    """Whether every field of ``block`` is an indexed one (RFC 7541, 6.1: a first bit
    of 1, then the index as a 7-bit prefix integer)."""
    position, end = 0, len(block)
    while position < end:
        first = block[position]
        if not first & 0x80:
            return False
        position += 1
        if first & 0x7F == 0x7F:  # more index bytes: top bit set on all but the last
            while position < end and block[position] & 0x80:
                position += 1
            position += 1
    return True


def hpack_literals(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A header block of literal fields without indexing, new names, no Huffman
    (RFC 7541, 6.2.2): any decoder reads it and it leaves no state on either side."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00" + _hpack_integer(len(name), 7) + name
        out += _hpack_integer(len(value), 7) + value
    return bytes(out)


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection to one Triton, its calls keyed by stream id.

    Only what a gRPC client needs: it sends HEADERS, DATA, RST_STREAM, WINDOW_UPDATE
    and SETTINGS/PING acknowledgements, and reads every frame type; Triton's header
    blocks go through an HPACK decoder (Huffman codes and a dynamic table)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_message_bytes: int) -> None:
        self.loop = loop
        self._limit = max_message_bytes
        self._calls: dict[int, H2Call] = {}
        self._transport: asyncio.Transport | None = None
        self._next_stream_id = 1
        self._decoder = HeaderDecoder()
        self._buffer = b""
        self._block = bytearray()  # a header block awaiting its CONTINUATION frames
        self._block_stream = 0
        self._block_ends_stream = False
        # Flow control of the whole connection (each call keeps its stream's): what
        # Triton lets us send, and what we have read and not yet given back.
        self._send_window = _DEFAULT_WINDOW
        self._initial_send_window = _DEFAULT_WINDOW
        self._max_frame = 16_384
        self._max_streams = 1 << 31
        self._unacknowledged = 0
        self._out: list[bytes] = []
        self.usable = True  # False once closed, told to go away or out of stream ids
        # Done when Triton's first SETTINGS arrived (its stream limit, its windows), or
        # the connection was lost before.
        self.ready: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _keep_alive(sock)
        settings = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in _SETTINGS_SENT)
        increment = (_WINDOW - _DEFAULT_WINDOW).to_bytes(4, "big")
        self._transport.write(
            _PREFACE + _frame(_SETTINGS, 0, 0, settings) + _frame(_WINDOW_UPDATE, 0, 0, increment)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        reason = f"the connection to Triton broke: {exc}"
        if not self.ready.done():
            self.ready.set_exception(rpc_error(_StatusCode.UNAVAILABLE, reason))
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        """End every call as UNAVAILABLE (the gateway may try another backend)."""
        self.usable = False
        for call in list(self._calls.values()):
            call._end(rpc_error(_StatusCode.UNAVAILABLE, reason))

    # -- calls --------------------------------------------------------------------------

    def full(self) -> bool:
        return len(self._calls) >= self._max_streams

    def start(self, path: bytes, headers: list[tuple[bytes, bytes]], message: bytes) -> H2Call:
        """A new call on this connection (which must be ``usable``)."""
        if self._transport is None:  # it closed while the caller waited for it to open
            raise rpc_error(_StatusCode.UNAVAILABLE, "the connection to Triton closed")
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        if self._next_stream_id > _MAX_STREAM_ID:
            self.usable = False  # its last stream id: the next call opens another connection
        call = H2Call(self, stream_id, message, self._initial_send_window)
        self._calls[stream_id] = call
        block = hpack_literals([(b":path", path), *headers])
        self._out.append(_frame(_HEADERS, _END_HEADERS, stream_id, block))
        self._send(call)
        self._flush()
        return call

    def reset(self, stream_id: int) -> None:
        """Tell Triton to stop the stream (it cancels the request)."""
        if self._transport is not None and stream_id in self._calls:
            self._out.append(_frame(_RST_STREAM, 0, stream_id, _CANCEL.to_bytes(4, "big")))
            self._flush()

    def forget(self, stream_id: int) -> None:
        self._calls.pop(stream_id, None)
        if not self._calls and not self.usable:
            self.close()  # retired and idle

    def retire(self) -> None:
        """No new calls; closed once the calls it has end."""
        self.usable = False
        if not self._calls:
            self.close()

    def close(self) -> None:
        self.usable = False
        if self._transport is not None:
            self._transport.close()

    def _send(self, call: H2Call) -> None:
        """As much of ``call``'s request as the flow-control windows allow."""
        stream_id, unsent, window = call._stream_id, call._unsent, call._send_window
        while unsent:
            room = min(window, self._send_window, self._max_frame)
            if room <= 0:
                break
            last = len(unsent) <= room
            chunk = unsent[:room]
            self._out.append(_frame(_DATA, _END_STREAM if last else 0, stream_id, bytes(chunk)))
            window -= len(chunk)
            self._send_window -= len(chunk)
            unsent = unsent[room:]
        call._send_window = window
        # All sent: not an empty view, which would keep the request's buffer alive.
        call._unsent = unsent if unsent else _ALL_SENT

    def _flush(self) -> None:
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    # -- frames from Triton -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        position, end = 0, len(buffer)
        try:
            while end - position >= 9:
                length = int.from_bytes(buffer[position : position + 3], "big")
                if end - position < 9 + length:
                    break
                if length > _FRAME_LIMIT:
                    raise _ProtocolError(f"a frame of {length} bytes")
                kind, flags = buffer[position + 3], buffer[position + 4]
                stream_id = (
                    int.from_bytes(buffer[position + 5 : position + 9], "big") & _MAX_STREAM_ID
                )
                position += 9
                self._frame(kind, flags, stream_id, buffer[position : position + length])
                position += length
        except (_ProtocolError, hpack.HPACKError) as exc:
            self._buffer = b""
            self._fail(f"Triton broke HTTP/2: {exc}")
            self.close()
            return
        self._buffer = buffer[position:]
        self._flush()

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block_stream and kind != _CONTINUATION:
            raise _ProtocolError("a header block without its CONTINUATION")
        if kind == _DATA:
            self._data_frame(flags, stream_id, payload)
        elif kind == _HEADERS:
            if flags & _PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & _PRIORITY:
                payload = payload[5:]
            self._header_block(stream_id, payload, flags & _END_HEADERS, flags & _END_STREAM)
        elif kind == _CONTINUATION:
            if stream_id != self._block_stream:
                raise _ProtocolError("a CONTINUATION frame out of place")
            self._header_block(stream_id, payload, flags & _END_HEADERS, self._block_ends_stream)
        elif kind == _SETTINGS:
            if not flags & _ACK:
                self._settings(payload)
                self._out.append(_frame(_SETTINGS, _ACK, 0))
                if not self.ready.done():
                    self.ready.set_result(None)
        elif kind == _WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & _MAX_STREAM_ID
            if stream_id == 0:
                self._send_window += increment
            elif (call := self._calls.get(stream_id)) is not None:
                call._send_window += increment
            self._send_waiting()
        elif kind == _RST_STREAM:
            call = self._calls.get(stream_id)
            if call is not None:
                error = int.from_bytes(payload[:4], "big")
                code = _RESET_CODES.get(error, _StatusCode.INTERNAL)
                call._end(rpc_error(code, f"Triton reset the stream (HTTP/2 error {error})"))
        elif kind == _PING:
            if not flags & _ACK:
                self._out.append(_frame(_PING, _ACK, 0, payload))
        elif kind == _GOAWAY:
            self.usable = False  # calls it did not take never started: retry elsewhere
            last = int.from_bytes(payload[:4], "big") & _MAX_STREAM_ID
            for other, call in list(self._calls.items()):
                if other > last:
                    call._end(rpc_error(_StatusCode.UNAVAILABLE, "Triton is going away"))
        elif kind == _PUSH_PROMISE:
            raise _ProtocolError("a push, which the client disabled")
        # PRIORITY and unknown frame types are ignored, as HTTP/2 says.

    def _data_frame(self, flags: int, stream_id: int, payload: bytes) -> None:
        # Flow control counts the whole frame, padding included, read or not.
        self._unacknowledged += len(payload)
        if self._unacknowledged >= _WINDOW // 2:
            increment = self._unacknowledged.to_bytes(4, "big")
            self._out.append(_frame(_WINDOW_UPDATE, 0, 0, increment))
            self._unacknowledged = 0
        call = self._calls.get(stream_id)
        if call is None:
            return  # a stream we reset
        call._unacknowledged += len(payload)
        if call._unacknowledged >= _WINDOW // 2 and not flags & _END_STREAM:
            increment = call._unacknowledged.to_bytes(4, "big")
            self._out.append(_frame(_WINDOW_UPDATE, 0, stream_id, increment))
            call._unacknowledged = 0
        if flags & _PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        call._data(payload, self._limit)
        if flags & _END_STREAM:
            call._finished()

    def _header_block(self, stream_id: int, fragment: bytes, complete: int, ends: int) -> None:
        self._block += fragment
        if not complete:
            self._block_stream, self._block_ends_stream = stream_id, bool(ends)
            return
        # Every block is decoded, a reset stream's too: the decoder's table is shared.
        headers = self._decoder.decode(bytes(self._block))
        self._block.clear()
        self._block_stream = 0
        call = self._calls.get(stream_id)
        if call is not None:
            call._headers(headers)
            if ends:
                call._finished()

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - 5, 6):
            key = int.from_bytes(payload[offset : offset + 2], "big")
            value = int.from_bytes(payload[offset + 2 : offset + 6], "big")
            if key == _INITIAL_WINDOW:
                delta = value - self._initial_send_window
                self._initial_send_window = value
                for call in self._calls.values():
                    call._send_window += delta
            elif key == _MAX_FRAME:
                self._max_frame = value
            elif key == _MAX_STREAMS:
                self._max_streams = value
            elif key == _HEADER_TABLE_SIZE:
                pass  # the client's blocks use no table
        self._send_waiting()

    def _send_waiting(self) -> None:
        for call in self._calls.values():
            if call._unsent:
                self._send(call)


def _keep_alive(sock: socket.socket) -> None:
    """A Triton that vanished without closing the connection (host down, network cut)
    is given up on as grpc.aio's keepalive did (a ping after 30 s, 10 s for its answer),
    by the kernel: a probe after 30 s idle, 10 s for its answer; data left unacknowledged
    for 40 s breaks the connection too. Its calls then fail as UNAVAILABLE."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 40_000)


class _ProtocolError(Exception):
    """Triton broke HTTP/2: the connection is closed and its calls fail."""


class H2Channel:
    """Calls to one Triton (``host:port``) over HTTP/2 connections opened on demand: one
    at a time, a new one when it is closed, told to go away, or full."""

    def __init__(self, target: str, max_message_bytes: int) -> None:
        host, _, port = target.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._limit = max_message_bytes
        self._base_headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", target.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def call(self, path: bytes, message: bytes, timeout: float, metadata: Metadata) -> H2Call:
        """Start a call of ``path`` with one request ``message``."""
        if len(message) > self._limit:
            raise rpc_error(
                _StatusCode.RESOURCE_EXHAUSTED,
                f"Sent message larger than max ({len(message)} vs. {self._limit})",
            )
        headers = [*self._base_headers, (b"grpc-timeout", grpc_timeout(timeout))]
        headers += [(k.encode(), v.encode()) for k, v in metadata]
        connection = self._connection
        if connection is None or not connection.usable or connection.full():
            try:
                async with asyncio.timeout(timeout):
                    connection = await self._new_connection()
            except TimeoutError:
                raise rpc_error(_StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        call = connection.start(path, headers, message)
        call._timer = connection.loop.call_later(timeout, call.expire)
        return call

    async def _new_connection(self) -> _Connection:
        """Retire the current connection (it closes once its calls end) and open one;
        concurrent callers share the opening."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None

    async def _connect(self) -> _Connection:
        """A connection that has Triton's SETTINGS: before them its stream limit is
        unknown, and calls beyond it would be refused. Bounded by CONNECT_TIMEOUT_S, as
        a connection shared by every caller must be, whatever their deadlines."""
        loop = asyncio.get_running_loop()
        where = f"{self._host}:{self._port}"
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop, self._limit), self._host, self._port
                )
                await connection.ready
        except TimeoutError:  # before OSError, of which it is a subclass
            if connection is not None:
                connection.close()
            raise rpc_error(
                _StatusCode.UNAVAILABLE, f"{where} did not answer HTTP/2 in {CONNECT_TIMEOUT_S} s"
            ) from None
        except OSError as exc:
            raise rpc_error(
                _StatusCode.UNAVAILABLE, f"failed to connect to {where}: {exc}"
            ) from None
        if self._connection is not None:
            self._connection.retire()
        self._connection = connection
        return connection

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.close()
