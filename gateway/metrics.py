"""Prometheus metrics of the gateway, served at ``GET /metrics``.

Per-request series are prometheus-client counters and histograms, measured cheaper
than OpenTelemetry's metrics SDK here (README, "Observability"); the histograms are
``FastHistogram``s, which expose exactly what prometheus-client's ``Histogram`` does for
a fraction of its cost per observation. Children are looked up once per label tuple
and kept, so a request costs dictionary hits, not ``labels()`` calls. Per-backend
gauges are read from the fleet state at scrape time.

Labels are bounded: ``model`` is a model the fleet has seen (else ``-``), ``backend``
a configured backend id, ``policy`` a policy name, ``tenant`` is ``-`` until tenants
exist, ``code`` an HTTP status and ``reason`` an admission refusal reason.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import cast

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import _use_created  # PROMETHEUS_DISABLE_CREATED_SERIES
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from fastpath import state as S
from fastpath.scoring import Scorer

from .fleet import Fleet
from .outliers import OutlierDetector

NONE = "-"  # a label that does not apply (no backend tried, unknown model, no tenant yet)
SERIES = ("model", "backend", "policy", "tenant")

# Seconds. Latencies span ms (embeddings) to minutes (long generations); overhead and
# scoring are the gateway's own µs-scale work.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_OVERHEAD_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1)
_SCORING_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3)
# Loop lag has ~1 ms resolution; 50 ms is the stall budget of the gateway's target.
_LOOP_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
# Finer from 20 to 100 ms: a full collection over many streams' objects lands there.
_GC_PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.2, 0.5, 1)


class FastHistogram(Collector):
    """A histogram family exposed exactly as prometheus-client's ``Histogram`` (same
    samples, labels, ``le`` strings, ``_count``, ``_sum`` and ``_created``, in the same
    order), observed with a bisect and two additions: measured here, 0.14 µs against
    0.8 µs for prometheus-client's child (a lock, two value objects), four times per
    request. Observed and collected on the event loop only, so it takes no lock."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.upper_bounds = (*(float(b) for b in buckets), math.inf)
        self._le = [floatToGoString(bound) for bound in self.upper_bounds]
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        if not self.labelnames:  # as prometheus-client: exposed from the start
            self._children[()] = HistogramChild(self.upper_bounds)
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramChild(self.upper_bounds)
        return child

    def observe(self, value: float) -> None:
        """An observation of the family without labels."""
        self._children[()].observe(value)

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, "histogram")
        for values, child in self._children.items():
            labels = dict(zip(self.labelnames, values, strict=True))
            total = 0.0
            for le, count in zip(self._le, child.counts, strict=True):
                total += count
                metric.add_sample(self.name + "_bucket", {**labels, "le": le}, total)
            metric.add_sample(self.name + "_count", labels, total)
            metric.add_sample(self.name + "_sum", labels, child.sum)
            if _use_created:
                metric.add_sample(self.name + "_created", labels, child.created)
        yield metric


class HistogramChild:
    """One label tuple's buckets (not cumulative: ``collect`` adds them up) and sum."""

    __slots__ = ("counts", "created", "sum", "upper_bounds")

    def __init__(self, upper_bounds: tuple[float, ...]) -> None:
        self.upper_bounds = upper_bounds
        self.counts = [0.0] * len(upper_bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # The first bucket whose bound is >= value (the last bound is +Inf).
        self.counts[bisect_left(self.upper_bounds, value)] += 1.0
        self.sum += value


class Series:
    """The children of one (model, backend, policy, tenant) label tuple."""

    __slots__ = ("duration", "failovers", "inter_token", "overhead", "ttft")

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str, str]) -> None:
        self.duration = metrics.duration.labels(*labels)
        self.overhead = metrics.overhead.labels(*labels)
        self.ttft = metrics.ttft.labels(*labels)
        self.inter_token = metrics.inter_token.labels(*labels)
        self.failovers = metrics.failovers.labels(*labels)


class Metrics:
    """The gateway's registry; its methods reuse each label tuple's children once made."""

    def __init__(self, fleet: Fleet, outliers: OutlierDetector, scorer: Scorer) -> None:
        self.fleet = fleet
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "meshgate_requests", "Inference requests answered, by HTTP status.",
            (*SERIES, "code"), registry=r,
        )  # fmt: skip
        self.refusals = Counter(
            "meshgate_admission_refusals", "Requests refused by admission, by reason.",
            ("model", "policy", "tenant", "reason"), registry=r,
        )  # fmt: skip
        self.failovers = Counter(
            "meshgate_failovers",
            "Attempts abandoned for the next backend (the gateway never retries the same one);"
            " backend is the one that failed.",
            SERIES, registry=r,
        )  # fmt: skip
        self.duration = FastHistogram(
            "meshgate_request_duration_seconds", "End-to-end latency of inference requests.",
            SERIES, buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.overhead = FastHistogram(
            "meshgate_gateway_overhead_seconds",
            "End-to-end latency minus the upstream window (first attempt to last response).",
            SERIES, buckets=_OVERHEAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = FastHistogram(
            "meshgate_time_to_first_token_seconds",
            "From request arrival to the first response (a stream's: once written to the client).",
            SERIES, buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token = FastHistogram(
            "meshgate_inter_token_seconds", "Gaps between consecutive streamed responses.",
            SERIES, buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.scoring = FastHistogram(
            "meshgate_scoring_seconds", "Time to rank the candidates and decide admission.",
            ("policy",), buckets=_SCORING_BUCKETS, registry=r,
        )  # fmt: skip
        self.loop_lag = FastHistogram(
            "meshgate_event_loop_lag_seconds",
            "How late the event loop woke a task whose timer was due (gateway/loop_lag.py):"
            " what every request on this process waited behind whatever held the loop"
            " (a lower bound on a stall: only its part after the wake-up was due).",
            (), buckets=_LOOP_LAG_BUCKETS, registry=r,
        )  # fmt: skip
        self.loop_lag_max = MaxSinceScrape(
            "meshgate_event_loop_lag_max_seconds",
            "The longest event-loop lag since the previous scrape of /metrics.",
        )
        r.register(self.loop_lag_max)
        gc_pause = FastHistogram(
            "meshgate_gc_pause_seconds",
            "Garbage collections on the event loop's thread, by generation (2: a full one),"
            " each as long as it held the loop (gateway/loop_lag.py).",
            ("generation",), buckets=_GC_PAUSE_BUCKETS, registry=r,
        )  # fmt: skip
        self._gc_pauses = tuple(gc_pause.labels(str(generation)) for generation in range(3))
        r.register(FleetCollector(fleet, outliers, scorer))
        self._series: dict[tuple[str, str, str, str], Series] = {}
        self._requests: dict[tuple[str, str, str, str, int], Counter] = {}
        self._refusals: dict[tuple[str, str, str, str], Counter] = {}
        self._scoring: dict[str, HistogramChild] = {}

    def model_label(self, model: str | None) -> str:
        """``model`` if the fleet has seen it; a client's made-up name must not become a series."""
        return model if model is not None and model in self.fleet.state.model_index else NONE

    def series(self, model: str, backend: str, policy: str, tenant: str) -> Series:
        key = (model, backend, policy, tenant)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(self, key)
        return found

    def count_request(self, model: str, backend: str, policy: str, tenant: str, code: int) -> None:
        key = (model, backend, policy, tenant, code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(*key[:4], str(code))
        child.inc()

    def count_refusal(self, model: str, policy: str, tenant: str, reason: str) -> None:
        key = (model, policy, tenant, reason)
        child = self._refusals.get(key)
        if child is None:
            child = self._refusals[key] = self.refusals.labels(*key)
        child.inc()

    def observe_scoring(self, policy: str, seconds: float) -> None:
        child = self._scoring.get(policy)
        if child is None:
            child = self._scoring[policy] = self.scoring.labels(policy)
        child.observe(seconds)

    def observe_loop_lag(self, seconds: float) -> None:
        """One reading of ``gateway.loop_lag.watch_loop_lag``."""
        self.loop_lag.observe(seconds)
        self.loop_lag_max.observe(seconds)

    def observe_gc_pause(self, generation: int, seconds: float) -> None:
        """One collection seen by ``gateway.loop_lag.watch_gc_pauses``."""
        self._gc_pauses[generation].observe(seconds)

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /metrics`` in Prometheus' text format."""
        return web.Response(
            body=generate_latest(self.registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )


class MaxSinceScrape(Collector):
    """A gauge of the largest value observed since the previous scrape, which resets
    it (as prom-client's ``nodejs_eventloop_lag_max_seconds``): a spike between two
    scrapes is never missed. Every scrape resets it, so scrape from one place."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0.0

    def observe(self, value: float) -> None:
        if value > self.value:
            self.value = value

    def describe(self) -> Iterator[Metric]:
        # Without it the registry would call collect() to learn the name, resetting the value.
        yield GaugeMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[Metric]:
        value, self.value = self.value, 0.0
        yield GaugeMetricFamily(self.name, self.documentation, value=value)


class FleetCollector(Collector):
    """Per-backend gauges, read from the fleet state when scraped (nothing per request)."""

    def __init__(self, fleet: Fleet, outliers: OutlierDetector, scorer: Scorer) -> None:
        self.fleet = fleet
        self.outliers = outliers
        self.scorer = scorer

    def collect(self) -> Iterator[Metric]:
        state = self.fleet.state
        array = state.array
        now = time.monotonic()
        slot_labels = ["backend", "model"]
        queue = GaugeMetricFamily(
            "meshgate_backend_queue_depth", "Requests queued at the backend (its metrics).",
            labels=slot_labels,
        )  # fmt: skip
        inflight = GaugeMetricFamily(
            "meshgate_backend_inflight", "Requests the gateway has in flight to the backend.",
            labels=slot_labels,
        )  # fmt: skip
        age = GaugeMetricFamily(
            "meshgate_backend_signal_age_seconds",
            "Age of the oldest expected signal; +Inf while never received.",
            labels=slot_labels,
        )  # fmt: skip
        used = GaugeMetricFamily(
            "meshgate_backend_vram_used_bytes", "VRAM used on the backend's most pressed GPU.",
            labels=["backend"],
        )  # fmt: skip
        total = GaugeMetricFamily(
            "meshgate_backend_vram_total_bytes", "VRAM of the backend's most pressed GPU.",
            labels=["backend"],
        )  # fmt: skip
        score = GaugeMetricFamily(
            "meshgate_backend_score",
            "The slot's hybrid score (lower is better), before the hard filters.",
            labels=slot_labels,
        )
        ejections = CounterMetricFamily(
            "meshgate_backend_ejections", "Times outlier detection ejected the backend.",
            labels=["backend"],
        )  # fmt: skip
        for backend in self.fleet.backends:
            slots = state.slots_of(backend.id)
            for slot in slots:
                labels = [backend.id, state.slot_keys[slot][1]]
                row = array[slot]
                queue.add_metric(labels, row[S.QUEUE_DEPTH])
                inflight.add_metric(labels, row[S.INFLIGHT])
                score.add_metric(labels, self.scorer.score(slot))
                signal_at = row[S.SIGNAL_AT]
                if signal_at != math.inf:  # +inf: no signal source is expected
                    age.add_metric(labels, math.inf if math.isnan(signal_at) else now - signal_at)
            if slots and backend.id in state.gpus:
                # Every slot of a backend holds the same VRAM reading.
                used.add_metric([backend.id], array[slots[0], S.VRAM_USED])
                total.add_metric([backend.id], array[slots[0], S.VRAM_TOTAL])
            count = cast(int, self.outliers.describe(backend.id)["ejections"])
            ejections.add_metric([backend.id], count)
        yield from (queue, inflight, age, used, total, score, ejections)
