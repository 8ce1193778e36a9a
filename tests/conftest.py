"""Shared test helpers: a free port on 127.0.0.1 (a free port base for Triton servers
is gateway.local_triton.find_free_port_base), a fastpath module's twins, and a soft
limit on open files for a child process."""

from __future__ import annotations

import resource
import socket
from types import ModuleType
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def limit_open_files(soft: int) -> None:
    """Set this process's soft limit on open files (for a child's ``preexec_fn``)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def twin_params(py: ModuleType, c: ModuleType | None) -> list[Any]:
    """A fastpath module's twins as pytest parameters: the pure-Python one ("py") and
    the compiled one ("c", skipped when it did not load)."""
    compiled = pytest.mark.skipif(c is None, reason="compiled twin not loaded")
    return [pytest.param(py, id="py"), pytest.param(c, id="c", marks=compiled)]


def loaded_twins(py: ModuleType, c: ModuleType | None) -> list[ModuleType]:
    """The twins that loaded, for tests that compare them with each other."""
    return [py] if c is None else [py, c]
