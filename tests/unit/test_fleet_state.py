"""The fleet state array as the scorer sees it: slots, signals, staleness, in-flight."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from adapters.deltas import GpuStateDelta, ModelStateDelta
from fastpath import state as S
from fastpath.scoring import Scorer, ScoringConfig
from gateway.fleet_state import FleetFull, FleetState

GiB = 2**30


def model_delta(
    backend: str, queue: int, at: float | None = None, max_age: float = 1.0
) -> ModelStateDelta:
    return ModelStateDelta(
        backend, "m", time.time() if at is None else at, max_age, queue_depth=queue
    )


def gpu_delta(
    backend: str, gpu: str, used: float, total: float = 80 * GiB, at: float | None = None
) -> GpuStateDelta:
    return GpuStateDelta(
        backend,
        gpu,
        time.time() if at is None else at,
        2.0,
        vram_used_bytes=int(used),
        vram_total_bytes=int(total),
    )


def fresh(fs: FleetState, slot: int) -> bool:
    row = fs.array[slot]
    return bool(time.monotonic() - row[S.SIGNAL_AT] <= row[S.MAX_AGE])


def test_backend_without_signal_source_is_never_stale() -> None:
    fs = FleetState(8)
    slot = fs.slot("b0", "m")
    assert fresh(fs, slot)
    assert fs.slot("b0", "m") == slot
    assert fs.candidates("m").tolist() == [slot]


def test_backend_with_metrics_is_stale_until_it_reports() -> None:
    fs = FleetState(8)
    fs.expect_runtime_signal("b0")
    slot = fs.slot("b0", "m")
    assert not fresh(fs, slot)
    assert fs.apply(model_delta("b0", 3))
    assert fresh(fs, slot)
    assert fs.array[slot, S.QUEUE_DEPTH] == 3


def test_old_signal_is_stale_and_out_of_order_delta_is_dropped() -> None:
    fs = FleetState(8)
    fs.expect_runtime_signal("b0")
    slot = fs.slot("b0", "m")
    now = time.time()
    assert fs.apply(model_delta("b0", 5, at=now - 10))  # observed 10 s ago, max age 1 s
    assert not fresh(fs, slot)
    assert fs.apply(model_delta("b0", 1, at=now))
    assert not fs.apply(model_delta("b0", 9, at=now - 5))  # older than what was applied
    assert fs.array[slot, S.QUEUE_DEPTH] == 1 and fresh(fs, slot)


def test_gpu_signal_once_seen_must_stay_fresh() -> None:
    fs = FleetState(8)
    slot = fs.slot("b0", "m")
    fs.apply(gpu_delta("b0", "GPU-0", 10 * GiB, at=time.time() - 30))
    assert not fresh(fs, slot)  # the GPU source reported once and then went quiet
    fs.apply(gpu_delta("b0", "GPU-0", 10 * GiB))
    assert fresh(fs, slot)


def test_most_pressed_gpu_decides_vram() -> None:
    fs = FleetState(8)
    slot = fs.slot("b0", "m")
    fs.apply(gpu_delta("b0", "GPU-0", 10 * GiB))
    fs.apply(gpu_delta("b0", "GPU-1", 70 * GiB))
    assert fs.array[slot, S.VRAM_USED] == 70 * GiB
    # A slot allocated later inherits the backend's GPU readings.
    late = fs.slot("b0", "other")
    assert fs.array[late, S.VRAM_USED] == 70 * GiB


def test_vram_over_threshold_removes_backend_from_ranking() -> None:
    fs = FleetState(8)
    slots = [fs.slot(b, "m") for b in ("b0", "b1")]
    for slot in slots:
        fs.set_ready(slot, True)
    scorer = Scorer(ScoringConfig(), fs.array)
    fs.apply(gpu_delta("b0", "GPU-0", 79 * GiB))  # 0.99 of 80 GiB: over 0.95
    fs.apply(gpu_delta("b1", "GPU-0", 10 * GiB))
    eligible = scorer.rank(fs.candidates("m"), S.POLICY_HYBRID, time.monotonic(), 0)
    assert scorer.ranked[:eligible].tolist() == [slots[1]]
    assert scorer.saturated == 1


def test_inflight_and_latency_ewma() -> None:
    fs = FleetState(4)
    slot = fs.slot("b0", "m")
    fs.dispatched(slot)
    fs.dispatched(slot)
    fs.finished(slot)
    assert fs.array[slot, S.INFLIGHT] == 1
    assert math.isnan(fs.array[slot, S.TTFT_EWMA])
    fs.record_ttft(slot, 1.0)
    fs.record_ttft(slot, 2.0)
    assert fs.array[slot, S.TTFT_EWMA] == pytest.approx(1.2)


def test_draining_marks_every_slot_of_the_backend() -> None:
    fs = FleetState(4)
    a, b, c = fs.slot("b0", "m"), fs.slot("b0", "n"), fs.slot("b1", "m")
    fs.set_draining("b0", True)
    assert fs.array[[a, b, c], S.DRAINING].tolist() == [1.0, 1.0, 0.0]


def test_capacity_is_bounded() -> None:
    fs = FleetState(2)
    fs.slot("b0", "m")
    fs.slot("b1", "m")
    with pytest.raises(FleetFull):
        fs.slot("b2", "m")
    assert np.array_equal(fs.candidates("m"), np.array([0, 1], dtype=np.int32))
