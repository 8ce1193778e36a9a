"""HTTP/1.1 pieces shared by the fast lane (client side) and the upstream pool."""

from __future__ import annotations

from collections.abc import Sequence

# Bodies larger than this are received into one buffer of their final size, so each
# byte is copied once (appending to a growing buffer would copy it again per resize).
PREALLOCATE_BYTES = 64 * 1024


class FixedBody:
    """A ``Content-Length`` body being received into a buffer of its final size."""

    __slots__ = ("buffer", "filled")

    def __init__(self, length: int) -> None:
        self.buffer = bytearray(length)
        self.filled = 0

    def feed(self, data: bytes | bytearray) -> bytes:
        """Copy what belongs to the body; return the bytes beyond it (the next message's)."""
        view = memoryview(data)
        take = min(len(view), len(self.buffer) - self.filled)
        self.buffer[self.filled : self.filled + take] = view[:take]
        self.filled += take
        return bytes(view[take:]) if take < len(view) else b""

    @property
    def complete(self) -> bool:
        return self.filled == len(self.buffer)


def post_head(host: bytes, path: str, headers: Sequence[tuple[str, str]], length: int) -> bytes:
    """The head of a POST of ``length`` body bytes to ``path`` on ``host``, with
    ``headers`` (values in Latin-1, as HTTP/1.1 allows), and its blank line."""
    lines = [b"POST ", path.encode(), b" HTTP/1.1\r\nHost: ", host, b"\r\nContent-Length: "]
    lines += (b"%d" % length, b"\r\n")
    for name, value in headers:
        lines += (name.encode(), b": ", value.encode("latin-1"), b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)
