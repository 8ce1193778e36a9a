"""adapters.deltas: only what changed, JSON round trip, validation, ordering."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import orjson
import pytest

from adapters.deltas import (
    AppliedClock,
    Delta,
    DeltaTracker,
    GpuStateDelta,
    ModelStateDelta,
    Ticks,
    batch_to_json,
    delta_from_json,
    deltas_from_json,
    every,
)

NOW = 1_700_000_000.0


def model_delta(observed_at: float = NOW, **changes: Any) -> ModelStateDelta:
    return ModelStateDelta("b0", "tiny_lm", observed_at, 1.0, **changes)


def gpu_delta(observed_at: float = NOW, **changes: Any) -> GpuStateDelta:
    return GpuStateDelta("b0", "GPU-1", observed_at, 8.0, **changes)


# -- DeltaTracker ----------------------------------------------------------------------


def test_first_observation_reports_every_measured_field() -> None:
    tracker = DeltaTracker()
    changes = tracker.changes("k", {"queue_depth": 3, "ready": True, "in_flight": None})
    assert changes == {"queue_depth": 3, "ready": True}


def test_later_observations_report_only_changed_fields() -> None:
    tracker = DeltaTracker()
    tracker.changes("k", {"queue_depth": 3, "ready": True, "exec_count": 10})
    assert tracker.changes("k", {"queue_depth": 3, "ready": True, "exec_count": 12}) == {
        "exec_count": 12
    }
    assert tracker.changes("k", {"queue_depth": 3, "ready": True, "exec_count": 12}) == {}
    # A field not measured this time is not a change, and is compared to the last value.
    assert tracker.changes("k", {"queue_depth": None, "exec_count": 12}) == {}
    assert tracker.changes("k", {"queue_depth": 0}) == {"queue_depth": 0}


def test_keys_are_tracked_separately_and_resync_reports_in_full() -> None:
    tracker = DeltaTracker()
    tracker.changes("a", {"x": 1})
    assert tracker.changes("b", {"x": 1}) == {"x": 1}
    tracker.resync()
    assert tracker.changes("a", {"x": 1}) == {"x": 1}
    tracker.forget("a")
    assert tracker.changes("a", {"x": 1}) == {"x": 1}


def test_changes_lists_non_none_state_fields_only() -> None:
    delta = model_delta(queue_depth=0, ready=False)
    assert delta.changes() == {"queue_depth": 0, "ready": False}
    assert gpu_delta().changes() == {}


# -- JSON ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "delta",
    [
        model_delta(),
        model_delta(
            queue_depth=4,
            in_flight=2,
            queue_time_s=0.25,
            exec_count=17,
            ready=True,
            kv_cache_fraction=0.5,
            waiting_requests=1,
        ),
        gpu_delta(vram_used_bytes=2**34, vram_total_bytes=2**35, utilization=1.0),
        gpu_delta(utilization=0),
    ],
)
def test_json_round_trip_through_orjson(delta: ModelStateDelta | GpuStateDelta) -> None:
    wire = orjson.dumps(delta.to_json())
    assert delta_from_json(orjson.loads(wire)) == delta


def test_to_json_carries_only_changed_fields() -> None:
    assert model_delta(queue_depth=0).to_json() == {
        "kind": "model",
        "backend": "b0",
        "model": "tiny_lm",
        "observed_at": NOW,
        "max_age": 1.0,
        "queue_depth": 0,
    }


def test_batch_round_trip() -> None:
    batch: list[Delta] = [model_delta(queue_depth=1), gpu_delta(vram_used_bytes=5)]
    assert deltas_from_json(orjson.loads(orjson.dumps(batch_to_json(batch)))) == batch


def test_explicit_null_means_unchanged() -> None:
    obj = model_delta().to_json() | {"queue_depth": None}
    assert delta_from_json(obj) == model_delta()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "disk"}, "expected `kind` to be 'model' or 'gpu', got str 'disk' - at $.kind"),
        ({"backend": ""}, "expected `backend` to be a non-empty string, got str '' - at $.backend"),
        ({"observed_at": "now"}, "expected `observed_at` to be a positive finite number"),
        ({"max_age": 0}, "expected `max_age` to be a positive finite number, got int 0"),
        ({"queue_depth": -1}, "expected `queue_depth` to be a non-negative integer, got int -1"),
        ({"queue_depth": 1.5}, "expected `queue_depth` to be a non-negative integer"),
        ({"queue_depth": True}, "expected `queue_depth` to be a non-negative integer, got bool"),
        ({"kv_cache_fraction": 1.5}, "expected `kv_cache_fraction` to be a number in [0, 1]"),
        ({"queue_time_s": float("nan")}, "expected `queue_time_s` to be a non-negative finite"),
        ({"ready": 1}, "expected `ready` to be a boolean, got int 1 - at $.ready"),
        ({"queue": 3}, "ModelStateDelta: unknown fields ['queue'] - at $"),
    ],
)
def test_invalid_model_delta_is_rejected_with_a_clear_message(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        delta_from_json(model_delta().to_json() | change)
    assert message in str(info.value)


def test_missing_required_field_is_named() -> None:
    obj = gpu_delta().to_json()
    del obj["gpu"]
    with pytest.raises(ValueError, match=r"GpuStateDelta: missing required `gpu` - at \$"):
        delta_from_json(obj)


def test_gpu_fields_are_validated() -> None:
    with pytest.raises(ValueError, match=r"`vram_used_bytes` to be a non-negative integer"):
        delta_from_json(gpu_delta().to_json() | {"vram_used_bytes": "1GB"})
    with pytest.raises(ValueError, match=r"GpuStateDelta: unknown fields \['queue_depth'\]"):
        delta_from_json(gpu_delta().to_json() | {"queue_depth": 1})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], r'expected \{"deltas": \[...\]\}, got list'),
        ({"deltas": {}}, r'expected \{"deltas": \[...\]\}'),
        ({"deltas": [1]}, r"expected a delta object, got int 1 - at \$\.deltas\[0\]"),
        (
            {"deltas": [{"kind": "gpu"}, {"kind": "gpu"}]},
            r"missing required `backend` - at \$\.deltas\[0\]",
        ),
    ],
)
def test_invalid_batches_are_rejected(body: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        deltas_from_json(body)


def test_error_path_points_into_the_batch() -> None:
    body = batch_to_json([model_delta(), gpu_delta()])
    body["deltas"][1]["utilization"] = 2
    with pytest.raises(ValueError, match=r"at \$\.deltas\[1\]\.utilization"):
        deltas_from_json(body)


# -- ordering and idempotence ----------------------------------------------------------


def apply(
    state: dict[tuple[str, str, str], dict[str, Any]], clock: AppliedClock, delta: Any
) -> None:
    """What a receiver does: drop what is not newer, then overwrite the changed fields."""
    if clock.admit(delta):
        state.setdefault(delta.key, {}).update(delta.changes())


def test_older_and_repeated_deltas_are_dropped() -> None:
    clock = AppliedClock()
    assert clock.admit(model_delta(NOW, queue_depth=5))
    assert not clock.admit(model_delta(NOW, queue_depth=5))  # the same delta again
    assert not clock.admit(model_delta(NOW - 1, queue_depth=9))  # arrived late
    assert clock.admit(model_delta(NOW + 1, queue_depth=0))
    assert clock.newest(model_delta().key) == NOW + 1


def test_keys_are_ordered_independently() -> None:
    clock = AppliedClock()
    assert clock.admit(model_delta(NOW))
    assert clock.admit(gpu_delta(NOW - 10))
    assert clock.admit(ModelStateDelta("b1", "tiny_lm", NOW - 10, 1.0))
    assert clock.admit(ModelStateDelta("b0", "embed", NOW - 10, 1.0))
    assert clock.newest(("model", "b9", "tiny_lm")) is None


def test_applying_out_of_order_and_twice_gives_the_in_order_state() -> None:
    deltas = [
        model_delta(NOW, queue_depth=3, ready=True, exec_count=1),
        model_delta(NOW + 1, queue_depth=7),
        model_delta(NOW + 2, exec_count=4),
        model_delta(NOW + 3, queue_depth=0),
    ]
    in_order: dict[tuple[str, str, str], dict[str, Any]] = {}
    in_order_clock = AppliedClock()
    for delta in deltas:
        apply(in_order, in_order_clock, delta)
    assert in_order[deltas[0].key] == {"queue_depth": 0, "ready": True, "exec_count": 4}

    shuffled: dict[tuple[str, str, str], dict[str, Any]] = {}
    clock = AppliedClock()
    for delta in [deltas[0], deltas[2], deltas[1], deltas[2], deltas[3], deltas[0]]:
        apply(shuffled, clock, delta)
    # The late NOW+1 delta (queue_depth=7) was dropped; the newest value won.
    assert shuffled == in_order


# -- the run loop ----------------------------------------------------------------------


async def test_every_returns_promptly_when_stopped_during_a_pause() -> None:
    stop = asyncio.Event()

    async def tick() -> None:
        asyncio.get_running_loop().call_later(0.05, stop.set)

    started = time.monotonic()
    await asyncio.wait_for(every(60.0, stop, tick), timeout=5)
    assert time.monotonic() - started < 2


# -- Ticks and every --------------------------------------------------------------------


def test_ticks_are_multiples_of_the_period() -> None:
    ticks = Ticks(0.25)
    assert ticks.delay(10.1) == pytest.approx(0.15)  # to 10.25
    assert ticks.delay(10.249) == pytest.approx(0.251)  # fired early: 10.5, not 10.25 again
    assert ticks.delay(10.502) == pytest.approx(0.248)  # fired late: 10.75
    assert ticks.delay(11.6) == pytest.approx(0.15)  # held past 11.0 and 11.25: 11.75


async def test_every_ticks_on_the_grid_until_stopped() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    times: list[float] = []

    async def tick() -> None:
        times.append(loop.time())
        if len(times) == 4:
            stop.set()

    await asyncio.wait_for(every(0.2, stop, tick), timeout=5)
    assert len(times) == 4
    # After the first (at once), each on a multiple of 200 ms, one interval apart (10 ms
    # of slack for a busy machine; a timer started off the grid lands there 1 time in 10).
    for at in times[1:]:
        assert min(at % 0.2, 0.2 - at % 0.2) < 0.01, times
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]
    assert all(gap >= 0.16 for gap in gaps), gaps
