"""Shared test helpers: a free port on 127.0.0.1 (a free port base for Triton servers
is gateway.local_triton.find_free_port_base)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
