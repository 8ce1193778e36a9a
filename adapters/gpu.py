"""GPU adapter: VRAM and utilization per GPU from NVML, as ``GpuStateDelta``s.

It runs inside the gateway when the gateway shares the host with the GPUs, or as a
sidecar on each GPU host (``meshgate adapter gpu``) that pushes its deltas to the
gateway's ``/admin/deltas`` as ``{"deltas": [...]}`` with ``Authorization: Bearer TOKEN``.

Without a GPU, NVML or driver the adapter says so once ("no GPU signal: <reason>") and
produces nothing: the backend's GPU readings then go stale, which the fleet treats as
saturated. It never invents numbers. ``ScriptedNvmlSource`` replays readings from a
JSON file for tests and demos on machines without a GPU; it is chosen only by the
explicit ``--scripted-source`` flag, never as a fallback.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from .deltas import (
    Delta,
    DeltaSink,
    DeltaTracker,
    GpuStateDelta,
    batch_to_json,
    every,
    max_age,
)

log = logging.getLogger("meshgate.adapters.gpu")

TOKEN_ENV = "MESHGATE_ADMIN_TOKEN"
# Deltas kept while the gateway is unreachable; the oldest go first. After a failed
# push the next poll is reported in full anyway, so old deltas only matter for order.
BACKLOG_LIMIT = 1024
PUSH_TIMEOUT_S = 5.0


class GpuUnavailable(Exception):
    """No GPU readings can be had (no NVML library, no driver, no device); says why."""


@dataclass(frozen=True)
class GpuReading:
    uuid: str
    used_bytes: int
    total_bytes: int
    utilization: float  # fraction of time busy, 0..1


class NvmlSource(Protocol):
    def readings(self) -> list[GpuReading]:
        """One reading per GPU now; raises GpuUnavailable if there is none to be had."""
        ...


class PynvmlSource:
    """Real readings through ``pynvml``. NVML is initialised on first use and again after
    a failure, so a driver that appears later is picked up."""

    def __init__(self) -> None:
        self._nvml: Any = None

    def readings(self) -> list[GpuReading]:
        nvml = self._init()
        try:
            result = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                busy = nvml.nvmlDeviceGetUtilizationRates(handle)
                result.append(
                    GpuReading(
                        # Older pynvml releases return bytes.
                        uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                        used_bytes=int(memory.used),
                        total_bytes=int(memory.total),
                        utilization=busy.gpu / 100.0,  # NVML reports percent
                    )
                )
        except nvml.NVMLError as exc:
            self.close()
            raise GpuUnavailable(f"NVML: {exc}") from exc
        if not result:
            raise GpuUnavailable("NVML found no GPU")
        return result

    def close(self) -> None:
        if self._nvml is not None:
            nvml, self._nvml = self._nvml, None
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as exc:
                log.debug("nvmlShutdown failed: %s", exc)

    def _init(self) -> Any:
        if self._nvml is not None:
            return self._nvml
        try:
            import pynvml  # here, not at import: hosts without a GPU never load it
        except ImportError as exc:
            raise GpuUnavailable(f"pynvml is not installed: {exc}") from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuUnavailable(f"NVML: {exc}") from exc
        self._nvml = pynvml
        return pynvml


class ScriptedNvmlSource:
    """Readings from a JSON file, re-read on every call so a test or demo can change them
    while the adapter runs: ``[{"uuid": str, "used": bytes, "total": bytes,
    "util": 0..1}, ...]``. An unreadable or invalid file raises GpuUnavailable."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def readings(self) -> list[GpuReading]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise GpuUnavailable(f"scripted source {self.path}: {exc}") from exc
        if not isinstance(entries, list) or not entries:
            raise GpuUnavailable(f"scripted source {self.path}: expected a non-empty list")
        try:
            return [_scripted_reading(entry) for entry in entries]
        except ValueError as exc:
            raise GpuUnavailable(f"scripted source {self.path}: {exc}") from exc


def _scripted_reading(entry: Any) -> GpuReading:
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object per GPU, got {entry!r}")
    uuid = entry.get("uuid")
    if not isinstance(uuid, str) or not uuid:
        raise ValueError(f"`uuid` must be a non-empty string, got {uuid!r}")
    return GpuReading(uuid, _bytes(entry, "used"), _bytes(entry, "total"), _util(entry))


def _bytes(entry: dict[str, Any], name: str) -> int:
    value = entry.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}")
    return value


def _util(entry: dict[str, Any]) -> float:
    value = entry.get("util")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError(f"`util` must be a number in [0, 1], got {value!r}")
    return float(value)


class GpuAdapter:
    """Polls a source every ``interval`` and reports ``GpuStateDelta``s for ``backend_id``."""

    def __init__(self, backend_id: str, source: NvmlSource, interval: float = 0.5) -> None:
        if interval <= 0:
            raise ValueError(f"poll interval must be > 0, got {interval}")
        self.backend_id = backend_id
        self.source = source
        self.interval = interval
        self.max_age = max_age(interval)
        # Why there is no GPU signal right now, or None while readings come in.
        self.no_signal: str | None = None
        self._tracker = DeltaTracker()

    def poll_once(self) -> list[GpuStateDelta]:
        """One delta per GPU (a heartbeat if nothing changed), or none without a GPU."""
        try:
            readings = self.source.readings()
        except GpuUnavailable as exc:
            if self.no_signal is None:
                log.warning("backend %s: no GPU signal: %s", self.backend_id, exc)
            self.no_signal = str(exc)
            return []
        if self.no_signal is not None:
            log.info("backend %s: GPU signal back (%d GPUs)", self.backend_id, len(readings))
        self.no_signal = None
        observed_at = time.time()
        deltas = []
        for reading in readings:
            changed = self._tracker.changes(
                reading.uuid,
                {
                    "vram_used_bytes": reading.used_bytes,
                    "vram_total_bytes": reading.total_bytes,
                    "utilization": reading.utilization,
                },
            )
            deltas.append(
                GpuStateDelta(self.backend_id, reading.uuid, observed_at, self.max_age, **changed)
            )
        return deltas

    def resync(self) -> None:
        """Report every reading in full on the next poll (the receiver may have lost state)."""
        self._tracker.resync()

    async def run(self, sink: DeltaSink, stop: asyncio.Event) -> None:
        """Poll every ``interval`` until ``stop`` is set, passing each delta to ``sink``.
        NVML calls take microseconds, so they run on the loop."""

        async def tick() -> None:
            for delta in self.poll_once():
                sink(delta)

        await every(self.interval, stop, tick)


class DeltaPusher:
    """POSTs deltas to the gateway; keeps a bounded backlog while the gateway is down."""

    def __init__(self, url: str, token: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session = session
        self._backlog: collections.deque[Delta] = collections.deque(maxlen=BACKLOG_LIMIT)
        self._failing = False

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    async def push(self, deltas: list[GpuStateDelta]) -> bool:
        """Send the backlog plus ``deltas``; True if the gateway took them. On a network
        or server error they stay queued for the next call; a rejected batch (4xx) is
        dropped, since sending it again cannot succeed."""
        self._backlog.extend(deltas)
        if not self._backlog:
            return True
        batch = list(self._backlog)
        try:
            async with self._session.post(
                self.url,
                json=batch_to_json(batch),
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT_S),
            ) as reply:
                status = reply.status
                detail = (await reply.text())[:200] if status >= 300 else ""
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._report_failure(f"{type(exc).__name__}: {exc}")
            return False
        if status >= 500:
            self._report_failure(f"HTTP {status} {detail}")
            return False
        self._backlog.clear()
        if status >= 300:
            self._report_failure(f"HTTP {status}, {len(batch)} deltas dropped: {detail}")
            return False
        if self._failing:
            log.info("push to %s recovered", self.url)
        self._failing = False
        return True

    def _report_failure(self, reason: str) -> None:
        if not self._failing:
            log.warning("push to %s failed: %s", self.url, reason)
        self._failing = True


# -- `meshgate adapter gpu` -------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `meshgate adapter gpu`."""
    parser.add_argument("--backend-id", required=True, help="id of this host's Triton backend")
    parser.add_argument(
        "--push", required=True, metavar="URL", help="the gateway's /admin/deltas URL"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"shared admin token (default ${TOKEN_ENV}, which keeps it out of `ps`)",
    )
    parser.add_argument(
        "--interval", type=float, default=0.5, help="seconds between polls (default 0.5)"
    )
    parser.add_argument(
        "--scripted-source",
        type=Path,
        metavar="FILE",
        help="read GPU readings from this JSON file instead of NVML (tests and demos)",
    )


def main(args: argparse.Namespace) -> int:
    """`meshgate adapter gpu`: push GPU deltas until SIGTERM/SIGINT; 2 on bad arguments."""
    if not args.token:
        print(f"meshgate adapter gpu: error: --token or ${TOKEN_ENV} is required", file=sys.stderr)
        return 2
    if args.interval <= 0:
        print("meshgate adapter gpu: error: --interval must be > 0", file=sys.stderr)
        return 2
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source: NvmlSource = (
        ScriptedNvmlSource(args.scripted_source) if args.scripted_source else PynvmlSource()
    )
    adapter = GpuAdapter(args.backend_id, source, args.interval)
    try:
        asyncio.run(_push_forever(adapter, args.push, args.token))
    finally:
        if isinstance(source, PynvmlSource):
            source.close()
    return 0


async def _push_forever(adapter: GpuAdapter, url: str, token: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("pushing GPU deltas of backend %s to %s", adapter.backend_id, url)
    async with aiohttp.ClientSession() as session:
        pusher = DeltaPusher(url, token, session)

        async def tick() -> None:
            if not await pusher.push(adapter.poll_once()):
                adapter.resync()

        await every(adapter.interval, stop, tick)
    log.info("stopped")
