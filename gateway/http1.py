"""HTTP/1.1 pieces shared by the fast lane (client side) and the upstream pool."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

# Bodies larger than this are received by a BodyReceiver, into one buffer of their
# final size (appending reads to a growing buffer would copy each byte once per resize).
PREALLOCATE_BYTES = 64 * 1024


class BodyReceiver(asyncio.BufferedProtocol):
    """Receives a ``Content-Length`` body of known size straight into a buffer of its
    final size: the connection's own protocol hands it the transport, the kernel writes
    each read into the buffer (no ``bytes`` per read, no copy in the gateway), and the
    transport goes back to that protocol with the whole body.

    Only as many bytes as the body lacks are asked for, so a read never takes the next
    message's bytes; the connection's protocol gets those, as it would any other."""

    __slots__ = ("_buffer", "_complete", "_filled", "_owner", "_progress", "_transport")

    def __init__(
        self,
        owner: asyncio.Protocol,
        transport: asyncio.Transport,
        length: int,
        received: bytes | bytearray,
        complete: Callable[[bytearray], None],
        progress: Callable[[], None] | None,
    ) -> None:
        """``received``: the body's first bytes, already read (fewer than ``length``);
        ``progress``: called after each read but the last."""
        self._owner = owner
        self._transport = transport
        self._complete = complete
        self._progress = progress
        self._buffer = bytearray(length)
        self._buffer[: len(received)] = received
        self._filled = len(received)
        transport.set_protocol(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled == len(self._buffer):
            self._transport.set_protocol(self._owner)
            self._complete(self._buffer)
        elif self._progress is not None:
            self._progress()

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._owner.pause_writing()

    def resume_writing(self) -> None:
        self._owner.resume_writing()


def receive_in_place(
    owner: asyncio.Protocol,
    transport: asyncio.Transport,
    length: int,
    buffer: bytearray,
    complete: Callable[[bytearray], None],
    progress: Callable[[], None] | None = None,
) -> bool:
    """For a body of ``length`` bytes, of which ``buffer`` holds the first: when it is
    large and not all here, a BodyReceiver takes the transport over from ``owner`` with
    what ``buffer`` holds (then emptied) and calls ``complete`` with the whole body
    (True); else nothing happens (False) and ``owner`` goes on reading it itself."""
    if length <= PREALLOCATE_BYTES or len(buffer) >= length:
        return False
    BodyReceiver(owner, transport, length, buffer, complete, progress)
    buffer.clear()
    return True


def post_head(host: bytes, path: str, headers: Sequence[tuple[str, str]], length: int) -> bytes:
    """The head of a POST of ``length`` body bytes to ``path`` on ``host``, with
    ``headers`` (values in Latin-1, as HTTP/1.1 allows), and its blank line."""
    lines = [b"POST ", path.encode(), b" HTTP/1.1\r\nHost: ", host, b"\r\nContent-Length: "]
    lines += (b"%d" % length, b"\r\n")
    for name, value in headers:
        lines += (name.encode(), b": ", value.encode("latin-1"), b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)
