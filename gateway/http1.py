"""HTTP/1.1 pieces shared by the fast lane (client side) and the upstream pool."""

from __future__ import annotations

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
