"""The fleet state array the scorer reads, and the only code that writes it.

A slot is one (backend, model) deployment: a row of ``fastpath.state`` columns.
Signals land here from three places: discovery (readiness), the signal plane
(``adapters`` deltas: queue depth, KV cache, VRAM) and the data plane (in-flight
counts and latency EWMAs, updated per request).

With ``--workers N`` the array is in shared memory (gateway/shared_fleet.py): the
signal process owns the slot layout (``slot`` allocates, only there) and publishes it;
each worker ``adopt``s it, so a slot number means the same deployment everywhere, and
counts its requests through an ``InflightCounter`` (atomic adds, see fastpath.inflight).

Staleness: a slot's freshness is limited by its most out-of-date expected source.
``SIGNAL_AT``/``MAX_AGE`` hold that source's observation time and max age, so the
scorer's ``now - SIGNAL_AT > MAX_AGE`` test means "some expected signal is stale".
A backend with no signal source configured is never stale (``SIGNAL_AT`` = +inf);
one whose source has not reported yet is stale (``SIGNAL_AT`` = NaN).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from adapters.deltas import AppliedClock, Delta, GpuStateDelta, ModelStateDelta
from fastpath import state as S
from fastpath.inflight import InflightCounter

RUNTIME = "runtime"  # the backend's Triton metrics endpoint
GPU = "gpu"  # NVML readings, in-process or pushed by a sidecar
_EWMA_ALPHA = 0.2  # weight of the newest latency sample


class FleetFull(RuntimeError):
    """More (backend, model) deployments than the state array has slots."""


class FleetState:
    def __init__(
        self,
        capacity: int,
        array: np.ndarray | None = None,
        inflight: InflightCounter | None = None,
    ) -> None:
        """``array``: an existing state array (shared memory), else a new one;
        ``inflight``: how a worker counts in-flight requests in a shared array (None:
        this process is the array's only writer of INFLIGHT)."""
        self.array = S.new_state(capacity) if array is None else array
        self._inflight = inflight
        self._slots: dict[tuple[str, str], int] = {}
        self.slot_keys: list[tuple[str, str]] = []
        self._backend_slots: dict[str, list[int]] = {}
        self._model_slots: dict[str, np.ndarray] = {}
        self.model_index: dict[str, int] = {}
        self._clock = AppliedClock()
        # Per slot: source name -> (observed at, monotonic clock; max age).
        self._sources: dict[int, dict[str, tuple[float, float]]] = {}
        self._runtime_expected: set[str] = set()
        # Per backend: GPU uuid -> (used bytes, total bytes, utilization).
        self.gpus: dict[str, dict[str, tuple[float, float, float]]] = {}
        self._gpu_seen: dict[str, tuple[float, float]] = {}

    # -- slots ------------------------------------------------------------------------------

    def slot(self, backend_id: str, model: str) -> int:
        """The slot of (backend, model), allocated on first sight."""
        key = (backend_id, model)
        found = self._slots.get(key)
        if found is not None:
            return found
        slot = self._register(key)
        if backend_id in self._runtime_expected:
            self.array[slot, S.SIGNAL_AT] = math.nan
        else:
            self.array[slot, S.SIGNAL_AT] = math.inf
            self.array[slot, S.MAX_AGE] = 0.0
        if backend_id in self._gpu_seen:
            self._sources[slot][GPU] = self._gpu_seen[backend_id]
            self._write_vram(backend_id, [slot])
        return slot

    def _register(self, key: tuple[str, str]) -> int:
        """Give ``key`` the next slot number and index it (the row is left as it is)."""
        slot = len(self.slot_keys)
        if slot >= len(self.array):
            raise FleetFull(f"fleet state is full: {slot} deployments (raise max_slots)")
        backend_id, model = key
        self._slots[key] = slot
        self.slot_keys.append(key)
        self._backend_slots.setdefault(backend_id, []).append(slot)
        previous = self._model_slots.get(model, np.empty(0, dtype=np.int32))
        self._model_slots[model] = np.append(previous, np.int32(slot))
        self.model_index.setdefault(model, len(self.model_index))
        self._sources[slot] = {}
        return slot

    def adopt(self, slot_keys: list[tuple[str, str]]) -> None:
        """Take the slots another process allocated in a shared array (``slot_keys`` as
        published by the signal process). Slots are never freed or renumbered, so what
        this process knows is a prefix of what is published."""
        if slot_keys[: len(self.slot_keys)] != self.slot_keys:
            raise ValueError("published slot layout does not extend the one adopted before")
        for key in slot_keys[len(self.slot_keys) :]:
            self._register(key)

    def expect_runtime_signal(self, backend_id: str) -> None:
        """This backend has a metrics endpoint: its slots are stale until it reports."""
        self._runtime_expected.add(backend_id)

    def candidates(self, model: str) -> np.ndarray | None:
        return self._model_slots.get(model)

    def slots_of(self, backend_id: str) -> list[int]:
        return self._backend_slots.get(backend_id, [])

    def set_ready(self, slot: int, ready: bool) -> None:
        self.array[slot, S.READY] = 1.0 if ready else 0.0

    def set_circuit(self, backend_id: str, *, open: bool, weight: float) -> None:
        """Outlier ejection: an open circuit takes the backend out; weight < 1 ramps it in."""
        for slot in self.slots_of(backend_id):
            self.array[slot, S.CIRCUIT_OPEN] = 1.0 if open else 0.0
            self.array[slot, S.WEIGHT] = weight

    def set_draining(self, backend_id: str, draining: bool) -> None:
        for slot in self.slots_of(backend_id):
            self.array[slot, S.DRAINING] = 1.0 if draining else 0.0

    # -- signal plane -----------------------------------------------------------------------

    def apply(self, delta: Delta) -> bool:
        """Apply one delta if it is newer than what was applied for its key."""
        if not self._clock.admit(delta):
            return False
        observed = time.monotonic() - max(0.0, time.time() - delta.observed_at)
        if isinstance(delta, ModelStateDelta):
            self._apply_model(delta, observed)
        else:
            self._apply_gpu(delta, observed)
        return True

    def _apply_model(self, delta: ModelStateDelta, observed: float) -> None:
        slot = self.slot(delta.backend, delta.model)
        row = self.array[slot]
        if delta.queue_depth is not None or delta.waiting_requests is not None:
            # TRT-LLM's own waiting queue is queue depth too, behind Triton's.
            pending = delta.queue_depth if delta.queue_depth is not None else 0
            row[S.QUEUE_DEPTH] = pending + (delta.waiting_requests or 0)
        if delta.kv_cache_fraction is not None:
            row[S.KV_FRACTION] = delta.kv_cache_fraction
        if delta.ready is False:
            # A faster hint than discovery: stop sending before the first failure.
            row[S.READY] = 0.0
        self._sources[slot][RUNTIME] = (observed, delta.max_age)
        self._write_freshness(slot)

    def _apply_gpu(self, delta: GpuStateDelta, observed: float) -> None:
        gpus = self.gpus.setdefault(delta.backend, {})
        used, total, util = gpus.get(delta.gpu, (0.0, 0.0, math.nan))
        if delta.vram_used_bytes is not None:
            used = float(delta.vram_used_bytes)
        if delta.vram_total_bytes is not None:
            total = float(delta.vram_total_bytes)
        if delta.utilization is not None:
            util = delta.utilization
        gpus[delta.gpu] = (used, total, util)
        self._gpu_seen[delta.backend] = (observed, delta.max_age)
        slots = self.slots_of(delta.backend)
        for slot in slots:
            self._sources[slot][GPU] = (observed, delta.max_age)
            self._write_freshness(slot)
        self._write_vram(delta.backend, slots)

    def _write_vram(self, backend_id: str, slots: list[int]) -> None:
        # A server may span several GPUs; the most pressed one decides.
        readings = [g for g in self.gpus.get(backend_id, {}).values() if g[1] > 0]
        if not readings:
            return
        used, total, _ = max(readings, key=lambda g: g[0] / g[1])
        for slot in slots:
            self.array[slot, S.VRAM_USED] = used
            self.array[slot, S.VRAM_TOTAL] = total

    def _write_freshness(self, slot: int) -> None:
        sources = self._sources[slot].values()
        observed, max_age = min(sources, key=lambda s: s[0] + s[1])
        if RUNTIME not in self._sources[slot] and self.slot_keys[slot][0] in self._runtime_expected:
            observed, max_age = math.nan, 0.0
        self.array[slot, S.SIGNAL_AT] = observed
        self.array[slot, S.MAX_AGE] = max_age

    # -- data plane -------------------------------------------------------------------------

    def dispatched(self, slot: int) -> None:
        if self._inflight is None:
            self.array[slot, S.INFLIGHT] += 1.0
        else:
            self._inflight.add(slot, 1)

    def finished(self, slot: int) -> None:
        if self._inflight is None:
            self.array[slot, S.INFLIGHT] -= 1.0
        else:
            self._inflight.add(slot, -1)

    def record_ttft(self, slot: int, seconds: float) -> None:
        _ewma(self.array, slot, S.TTFT_EWMA, seconds)

    def record_tpot(self, slot: int, seconds: float) -> None:
        _ewma(self.array, slot, S.TPOT_EWMA, seconds)

    # -- views ------------------------------------------------------------------------------

    def describe_slot(self, slot: int, now: float) -> dict[str, Any]:
        row = self.array[slot]
        ages = {
            name: round(now - observed, 3) for name, (observed, _) in self._sources[slot].items()
        }
        stale = not (now - row[S.SIGNAL_AT] <= row[S.MAX_AGE])
        return {
            "queue_depth": row[S.QUEUE_DEPTH],
            "inflight": row[S.INFLIGHT],
            "vram_used_bytes": row[S.VRAM_USED],
            "vram_total_bytes": row[S.VRAM_TOTAL],
            "kv_cache_fraction": _json_number(row[S.KV_FRACTION]),
            "ttft_ewma_s": _json_number(row[S.TTFT_EWMA]),
            "tpot_ewma_s": _json_number(row[S.TPOT_EWMA]),
            "ready": row[S.READY] == 1.0,
            "draining": row[S.DRAINING] == 1.0,
            "circuit_open": row[S.CIRCUIT_OPEN] == 1.0,
            "weight": row[S.WEIGHT],
            "signal_ages_s": ages,
            "stale": stale,
        }


def _ewma(array: np.ndarray, slot: int, column: int, sample: float) -> None:
    previous = array[slot, column]
    array[slot, column] = (
        sample if math.isnan(previous) else previous + _EWMA_ALPHA * (sample - previous)
    )


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
