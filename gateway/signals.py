"""The signal plane inside the gateway: one Triton runtime scraper per backend with a
metrics endpoint, writing deltas into the fleet state."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from adapters.triton_runtime import ScrapeError, TritonRuntimeAdapter

from .config import GatewayConfig
from .fleet import Fleet

log = logging.getLogger("meshgate.signals")


class SignalPlane:
    def __init__(self, fleet: Fleet, config: GatewayConfig) -> None:
        self._fleet = fleet
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Scrape every backend once (so the first requests see fresh signals), then
        keep scraping in the background."""
        # One connection per backend is all the scrapers need; bounded, never a queue.
        connector = aiohttp.TCPConnector(limit=max(1, len(self._config.backends)))
        self._session = aiohttp.ClientSession(connector=connector)
        adapters = [
            TritonRuntimeAdapter(
                spec.id, spec.metrics_url, self._session, interval=self._config.scrape_interval_s
            )
            for spec in self._config.backends
            if spec.metrics_url
        ]
        await asyncio.gather(*(self._first_scrape(a) for a in adapters))
        self._tasks = [
            asyncio.create_task(
                a.run(self._fleet.state.apply, self._stop), name=f"scrape-{a.backend_id}"
            )
            for a in adapters
        ]

    async def _first_scrape(self, adapter: TritonRuntimeAdapter) -> None:
        try:
            for delta in await adapter.scrape_once():
                self._fleet.state.apply(delta)
        except ScrapeError as exc:
            log.warning("first scrape of %s failed: %s", adapter.backend_id, exc)

    async def close(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
