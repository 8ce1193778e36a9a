"""gateway.server.serve: what it does around the listening socket."""

from __future__ import annotations

import asyncio
import gc

from aiohttp import web
from aiohttp.web_runner import GracefulExit

from gateway import server
from gateway.config import GatewayConfig


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
