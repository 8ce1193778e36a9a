"""The signal plane inside the gateway: one Triton runtime scraper per backend with a
metrics endpoint, writing deltas into the fleet state. Backends that join the fleet at
run time get a scraper; backends that leave lose theirs.

With ``--workers N`` it runs in the signal process only: a worker's fleet follows that
process (``Fleet.follows``), and its signal plane scrapes nothing."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from adapters.triton_runtime import ScrapeError, TritonRuntimeAdapter

from .config import BackendSpec, GatewayConfig
from .fleet import Fleet

log = logging.getLogger("meshgate.signals")


class SignalPlane:
    def __init__(self, fleet: Fleet, config: GatewayConfig) -> None:
        self._fleet = fleet
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._stop = asyncio.Event()
        self._scrapers: dict[str, asyncio.Task[None]] = {}
        fleet.listeners.append(self)

    async def start(self) -> None:
        """Scrape every backend once (so the first requests see fresh signals), then
        keep scraping in the background; nothing in a worker (see the module docstring)."""
        if self._fleet.follows:
            return
        # One connection per metrics endpoint is all a scraper needs: bounded, never a queue.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=1)
        session = self._session = aiohttp.ClientSession(connector=connector)
        adapters = [
            self._adapter(session, b.spec.id, b.spec.metrics_url)
            for b in self._fleet.backends
            if b.spec.metrics_url
        ]
        await asyncio.gather(*(self._first_scrape(a) for a in adapters))
        for adapter in adapters:
            self._run(adapter)

    def backend_added(self, spec: BackendSpec) -> None:
        # Before start() there is no session yet: start() scrapes every backend then.
        if self._session is None or self._stop.is_set() or not spec.metrics_url:
            return
        self._run(self._adapter(self._session, spec.id, spec.metrics_url))

    def backend_removed(self, backend_id: str) -> None:
        scraper = self._scrapers.pop(backend_id, None)
        if scraper is not None:
            scraper.cancel()

    def _adapter(
        self, session: aiohttp.ClientSession, backend_id: str, metrics_url: str
    ) -> TritonRuntimeAdapter:
        return TritonRuntimeAdapter(
            backend_id, metrics_url, session, interval=self._config.scrape_interval_s
        )

    def _run(self, adapter: TritonRuntimeAdapter) -> None:
        self._scrapers[adapter.backend_id] = asyncio.create_task(
            adapter.run(self._fleet.state.apply, self._stop), name=f"scrape-{adapter.backend_id}"
        )

    async def _first_scrape(self, adapter: TritonRuntimeAdapter) -> None:
        try:
            for delta in await adapter.scrape_once():
                self._fleet.state.apply(delta)
        except ScrapeError as exc:
            log.warning("first scrape of %s failed: %s", adapter.backend_id, exc)

    async def close(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._scrapers.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
