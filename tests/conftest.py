"""Shared test helpers: free ports on 127.0.0.1."""

from __future__ import annotations

import random
import socket


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_base(span: int, low: int = 20000, high: int = 45000) -> int:
    """A base port P such that P..P+span-1 are all free on 127.0.0.1 now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - span)
        if all(port_is_free(base + i) for i in range(span)):
            return base
    raise RuntimeError(f"no {span} consecutive free ports in {low}-{high}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
