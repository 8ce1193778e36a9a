"""gateway.server.serve: what it does around the listening socket."""

from __future__ import annotations

import asyncio
import gc
import resource
import subprocess
import sys

from aiohttp import web
from aiohttp.web_runner import GracefulExit

from gateway import server
from gateway.config import GatewayConfig
from tests.conftest import limit_open_files


def test_what_startup_made_is_frozen_before_the_gateway_listens() -> None:
    """A full garbage collection then walks only requests' objects, not the ~65,000
    the imports and the app made (gateway/server.py says why)."""
    assert gc.get_freeze_count() == 0
    frozen_when_listening = []

    def on_listening() -> None:
        frozen_when_listening.append(gc.get_freeze_count())
        raise GracefulExit  # serve() stops as on SIGTERM

    try:
        server.serve(
            web.Application(),
            GatewayConfig(port=0, fast_lane=False),
            None,
            on_listening=on_listening,
        )
    finally:
        gc.unfreeze()  # the rest of the test session collects as before
        asyncio.set_event_loop(None)
    assert len(frozen_when_listening) == 1
    assert frozen_when_listening[0] > 10_000


def test_the_open_files_soft_limit_is_raised_to_the_hard_limit() -> None:
    """In a child process started with a soft limit of 64 (this one's is left alone)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = (
        "import resource\n"
        "from gateway.server import raise_open_files_limit\n"
        "print(raise_open_files_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=lambda: limit_open_files(64),
        capture_output=True,
        text=True,
        check=True,
    )
    returned, soft, child_hard = map(int, child.stdout.split())
    expected = hard if hard != resource.RLIM_INFINITY else server._MAX_OPEN_FILES
    assert (returned, soft, child_hard) == (expected, expected, hard)
