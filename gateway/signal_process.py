"""The signal process of a gateway running ``--workers N``: discovery and the signal
plane, once for every worker.

It owns the fleet: it discovers the backends, scrapes their metrics, allocates slots
and writes the signal columns of the shared state array (gateway/shared_fleet.py).
Workers route with that array, and reach this process over a Unix socket that only
they use:

- ``GET /layout``: the pickled ``(generation, FleetLayout)``; workers fetch it when the
  segment's generation differs from the one they hold (checked every 0.1 s);
- ``GET /backends``: ``Fleet.describe`` (signal ages and GPU readings live only here);
- ``POST /deltas``: deltas that sidecars pushed to a worker's ``/admin/deltas``.
"""

from __future__ import annotations

import asyncio
import pickle
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from adapters.deltas import Delta, batch_to_json, deltas_from_json, every

from .config import GatewayConfig
from .fleet import Fleet, FleetLayout
from .fleet_state import FleetState
from .shared_fleet import SharedFleetMemory
from .signals import SignalPlane

# How often the fleet is compared with the layout last published.
_PUBLISH_INTERVAL_S = 0.1


class SignalProcess:
    """The fleet, its signal plane and the socket workers ask; ``start`` then ``close``."""

    def __init__(self, config: GatewayConfig, memory: SharedFleetMemory, socket: Path) -> None:
        self.fleet = Fleet(config, FleetState(config.max_slots, memory.state))
        self._signals = SignalPlane(self.fleet, config)
        self._memory = memory
        self.socket = socket
        self._layout: FleetLayout | None = None
        self._published = b""
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        app = web.Application()
        app.router.add_get("/layout", self._get_layout)
        app.router.add_get("/backends", self._get_backends)
        app.router.add_post("/deltas", self._post_deltas)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        """Discover and scrape once, publish the layout, then serve workers and keep
        discovering, scraping and publishing in the background."""
        await self.fleet.start()
        await self._signals.start()
        self._publish()
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket)).start()
        self._tasks.append(
            asyncio.create_task(
                every(_PUBLISH_INTERVAL_S, self._stop, self._publish_changes), name="publish"
            )
        )

    async def close(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._runner.cleanup()
        await self._signals.close()
        await self.fleet.close()

    async def _publish_changes(self) -> None:
        self._publish()

    def _publish(self) -> None:
        layout = self.fleet.layout()
        if layout == self._layout:
            return
        # The bytes are ready before the generation says they changed.
        generation = self._memory.generation + 1
        self._published = pickle.dumps((generation, layout))
        self._layout = layout
        self._memory.bump_generation()

    async def _get_layout(self, request: web.Request) -> web.Response:
        return web.Response(body=self._published)

    async def _get_backends(self, request: web.Request) -> web.Response:
        view = self.fleet.describe(time.monotonic())
        return web.Response(body=orjson.dumps(view, option=orjson.OPT_SERIALIZE_NUMPY))

    async def _post_deltas(self, request: web.Request) -> web.Response:
        deltas = deltas_from_json(orjson.loads(await request.read()))
        applied = await self.fleet.apply_deltas(deltas)
        return web.Response(body=orjson.dumps(applied))


class SignalProcessClient:
    """A worker's ``SignalProcessLink``: the socket above, and the segment's generation."""

    def __init__(self, socket: Path, memory: SharedFleetMemory) -> None:
        self._socket = socket
        self._memory = memory
        self._generation = -1
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running loop.
        if self._session is None:
            connector = aiohttp.UnixConnector(path=str(self._socket))
            self._session = aiohttp.ClientSession(
                "http://signal-process", connector=connector, raise_for_status=True
            )
        return self._session

    async def layout(self) -> FleetLayout:
        async with self._client().get("/layout") as reply:
            generation, layout = pickle.loads(await reply.read())
        self._generation = generation
        assert isinstance(layout, FleetLayout)
        return layout

    async def newer_layout(self) -> FleetLayout | None:
        if self._memory.generation == self._generation:
            return None
        return await self.layout()

    async def describe(self) -> list[dict[str, Any]]:
        async with self._client().get("/backends") as reply:
            view: list[dict[str, Any]] = orjson.loads(await reply.read())
        return view

    async def apply_deltas(self, deltas: list[Delta]) -> int:
        body = orjson.dumps(batch_to_json(deltas))
        async with self._client().post("/deltas", data=body) as reply:
            applied: int = orjson.loads(await reply.read())
        return applied

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
