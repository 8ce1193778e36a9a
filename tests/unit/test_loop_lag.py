"""gateway.loop_lag and its metrics: a stall of the loop is seen and exposed."""

from __future__ import annotations

import asyncio
import gc
import time

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fastpath.scoring import Scorer, ScoringConfig
from gateway.config import GatewayConfig
from gateway.fleet import Fleet
from gateway.loop_lag import watch_gc_pauses, watch_loop_lag
from gateway.metrics import MaxSinceScrape, Metrics
from gateway.outliers import OutlierDetector


async def test_a_blocked_loop_is_measured_as_lag() -> None:
    readings: list[float] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_loop_lag(readings.append, stop, interval=0.005))
    await asyncio.sleep(0.02)
    time.sleep(0.05)  # holds the loop while the watcher's timer is due
    await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(watcher, timeout=1)
    assert min(readings) >= 0.0
    # The stall is at least 50 ms minus the part of the interval still to go.
    assert max(readings) >= 0.04


async def test_each_collection_on_the_loop_is_recorded_with_its_generation() -> None:
    pauses: list[tuple[int, float]] = []
    callbacks = len(gc.callbacks)
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_gc_pauses(lambda g, s: pauses.append((g, s)), stop))
    await asyncio.sleep(0)  # the watcher is installed
    gc.collect(0)
    gc.collect(2)
    await asyncio.to_thread(gc.collect)  # another thread's: not the loop's
    stop.set()
    await asyncio.wait_for(watcher, timeout=1)
    gc.collect()  # after the watcher stopped
    assert [generation for generation, _ in pauses] == [0, 2]
    assert all(seconds >= 0 for _, seconds in pauses)
    assert len(gc.callbacks) == callbacks  # removed once stopped


def test_max_since_scrape_resets_on_each_scrape() -> None:
    gauge = MaxSinceScrape("lag_max_seconds", "doc")
    gauge.observe(0.002)
    gauge.observe(0.03)
    gauge.observe(0.001)
    assert [s.value for f in gauge.collect() for s in f.samples] == [0.03]
    assert [s.value for f in gauge.collect() for s in f.samples] == [0.0]


def gateway_metrics() -> Metrics:
    fleet = Fleet(GatewayConfig())
    return Metrics(
        fleet,
        OutlierDetector(fleet, GatewayConfig().outlier),
        Scorer(ScoringConfig(), fleet.state.array),
    )


def exposed(metrics: Metrics) -> dict[tuple[str, str | None, str | None], float]:
    """Each sample of /metrics by (name, its generation label, its le label)."""
    return {
        (s.name, s.labels.get("generation"), s.labels.get("le")): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }


def test_loop_lag_is_exposed() -> None:
    metrics = gateway_metrics()
    metrics.observe_loop_lag(0.003)
    metrics.observe_loop_lag(0.07)
    samples = exposed(metrics)
    assert samples[("meshgate_event_loop_lag_seconds_count", None, None)] == 2
    assert samples[("meshgate_event_loop_lag_seconds_bucket", None, "0.05")] == 1
    assert samples[("meshgate_event_loop_lag_max_seconds", None, None)] == 0.07


def test_gc_pauses_are_exposed_by_generation() -> None:
    metrics = gateway_metrics()
    metrics.observe_gc_pause(0, 0.0004)
    metrics.observe_gc_pause(2, 0.06)
    samples = exposed(metrics)
    assert samples[("meshgate_gc_pause_seconds_count", "0", None)] == 1
    assert samples[("meshgate_gc_pause_seconds_count", "1", None)] == 0
    assert samples[("meshgate_gc_pause_seconds_bucket", "2", "0.05")] == 0
    assert samples[("meshgate_gc_pause_seconds_bucket", "2", "0.1")] == 1
