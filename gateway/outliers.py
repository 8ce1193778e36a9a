"""Outlier ejection: a backend that keeps failing is taken out of rotation for a
growing period, health-checked while out, and brought back at reduced weight.

Envoy-like defaults: 5 consecutive failures eject for 30 s x the number of times it
was ejected (capped at 300 s); at most half the fleet is ever ejected; an ejected
backend returns once its period is over and `ServerReady` answers true over gRPC, or
as soon as a probe succeeds after one failed (the server was down and is back); it
re-enters at weight 0.25, doubling each health-check interval up to 1.
Failures are what say "this backend, not this request": connection failures,
UNAVAILABLE, and stalled streams. A success resets the count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from tritonclient.grpc import service_pb2 as pb

from adapters.deltas import every

from .config import OutlierConfig
from .fleet import Backend, Fleet

log = logging.getLogger("meshgate.outliers")


@dataclass
class _Record:
    failures: int = 0
    ejections: int = 0
    ejected_until: float | None = None  # monotonic; None while in rotation
    weight: float = 1.0
    # A health check failed during this ejection: a later success means the server
    # came back (restarted), which ends the ejection early, as in Envoy.
    seen_unhealthy: bool = False
    # A request could not connect: out of rotation until a probe answers (not an
    # ejection: no growing period; the failure still counts towards one).
    unreachable: bool = False


@dataclass
class OutlierDetector:
    fleet: Fleet
    config: OutlierConfig
    _records: dict[str, _Record] = field(default_factory=dict)

    def _record(self, backend_id: str) -> _Record:
        return self._records.setdefault(backend_id, _Record())

    def succeeded(self, backend_id: str) -> None:
        record = self._records.get(backend_id)
        if record is not None:
            record.failures = 0

    def failed(self, backend_id: str) -> None:
        record = self._record(backend_id)
        record.failures += 1
        if record.ejected_until is None and record.failures >= self.config.consecutive_failures:
            self._eject(backend_id, record)

    def unreachable(self, backend_id: str) -> None:
        """A request could not reach the backend: stop routing to it now, probe it every
        health-check interval, and count the failure towards an ejection."""
        record = self._record(backend_id)
        if not record.unreachable:
            record.unreachable = True
            self.fleet.state.set_circuit(backend_id, open=True, weight=record.weight)
        self.failed(backend_id)

    def ejected(self) -> list[str]:
        return [b for b, r in self._records.items() if r.ejected_until is not None]

    def _eject(self, backend_id: str, record: _Record) -> None:
        limit = int(self.config.max_ejected_fraction * len(self.fleet.backends))
        if len(self.ejected()) + 1 > limit:
            log.warning(
                "backend %s failing but not ejected: %d of %d already out",
                backend_id,
                len(self.ejected()),
                len(self.fleet.backends),
            )
            return
        record.ejections += 1
        period = min(self.config.base_ejection_s * record.ejections, self.config.max_ejection_s)
        record.ejected_until = time.monotonic() + period
        record.failures = 0
        self.fleet.state.set_circuit(backend_id, open=True, weight=0.0)
        log.warning(
            "backend %s ejected for %.0f s after %d consecutive failures",
            backend_id,
            period,
            self.config.consecutive_failures,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Health-check ejected backends and ramp re-entered ones, every interval."""
        await every(self.config.health_check_interval_s, stop, self._check)

    async def _check(self) -> None:
        now = time.monotonic()
        for backend_id, record in list(self._records.items()):
            backend = self.fleet.by_id.get(backend_id)
            if backend is None:  # it left the fleet (DNS discovery)
                del self._records[backend_id]
            elif record.ejected_until is not None:
                if not await _healthy(backend):
                    record.seen_unhealthy = True
                elif now >= record.ejected_until or record.seen_unhealthy:
                    record.ejected_until = None
                    record.seen_unhealthy = record.unreachable = False
                    record.weight = self.config.reentry_weight
                    self.fleet.state.set_circuit(backend_id, open=False, weight=record.weight)
                    log.info("backend %s back at weight %.2f", backend_id, record.weight)
            elif record.unreachable:
                if await _healthy(backend):
                    record.unreachable = False
                    self.fleet.state.set_circuit(backend_id, open=False, weight=record.weight)
                    log.info("backend %s reachable again", backend_id)
            elif record.weight < 1.0:
                record.weight = min(1.0, record.weight * 2)
                self.fleet.state.set_circuit(backend_id, open=False, weight=record.weight)

    def describe(self, backend_id: str) -> dict[str, object]:
        record = self._records.get(backend_id, _Record())
        remaining = None
        if record.ejected_until is not None:
            remaining = round(max(0.0, record.ejected_until - time.monotonic()), 3)
        return {
            "consecutive_failures": record.failures,
            "ejections": record.ejections,
            "ejected_for_s": remaining,
            "unreachable": record.unreachable,
            "weight": record.weight,
        }


async def _healthy(backend: Backend) -> bool:
    try:
        reply = await backend.channel.control.ServerReady(pb.ServerReadyRequest(), timeout=1.0)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.ready)
