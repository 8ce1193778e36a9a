"""gateway.metrics.FastHistogram: exposed exactly as prometheus-client's Histogram."""

from __future__ import annotations

import random
import re

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import FastHistogram

BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1, 1, 60)


def _exposition(registry: CollectorRegistry) -> str:
    # _created is the time a series was made: the same in both but for the clock.
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", generate_latest(registry).decode())


def test_exposition_is_prometheus_clients() -> None:
    theirs, ours = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    labelled = (
        Histogram("x_seconds", "Doc.", ("model", "backend"), buckets=BUCKETS, registry=theirs),
        FastHistogram("x_seconds", "Doc.", ("model", "backend"), BUCKETS, ours),
    )
    unlabelled = (
        Histogram("y_seconds", "Other.", buckets=(1, 2.5, 5), registry=theirs),
        FastHistogram("y_seconds", "Other.", (), (1, 2.5, 5), ours),
    )
    assert _exposition(theirs) == _exposition(ours)  # before any observation
    rng = random.Random(5)
    for _ in range(5000):
        labels = (rng.choice(["embed", "tiny_lm"]), rng.choice(["a", "b", "-"]))
        # Values on bucket bounds too: a bound belongs to its own bucket (le).
        value = rng.choice([rng.random() * 0.2, rng.choice(BUCKETS), 0.0, 100.0])
        for histogram in labelled:
            histogram.labels(*labels).observe(value)
        for histogram in unlabelled:
            histogram.observe(value * 30)
    assert _exposition(theirs) == _exposition(ours)
    sample = ours.get_sample_value("x_seconds_count", {"model": "embed", "backend": "a"})
    assert sample == theirs.get_sample_value("x_seconds_count", {"model": "embed", "backend": "a"})
