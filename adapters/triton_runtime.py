"""Scrape one Triton server's metrics endpoint and turn it into state deltas.

Per model (all loaded versions of a model added together, since the gateway routes by
model name):

- ``queue_depth``: ``nv_inference_pending_request_count``.
- ``exec_count``: ``nv_inference_exec_count`` (cumulative).
- ``queue_time_s``: growth of ``nv_inference_queue_duration_us`` divided by growth of
  ``nv_inference_request_success`` between two scrapes: the average time the requests
  that completed in that window spent queued. Triton adds a request's queue time when
  the request completes, and per request, not per batch, hence the request counter
  rather than the execution counter. A window in which no request completed reads as
  0 s if nothing is queued (a request arriving now would not wait) and leaves the value
  unchanged otherwise; a counter that went down (Triton restarted) skips one window.
- ``ready``: a model is ready while Triton exports its per-model metrics, which it does
  for loaded models only; a model seen before and missing from a later successful
  scrape is reported ``ready=False``. Discovery (``gateway/fleet.py``) stays the
  authority for routing; this is the faster hint between discovery passes.
- ``in_flight``, ``waiting_requests``, ``kv_cache_fraction``: TensorRT-LLM's
  ``nv_trt_llm_request_metrics{request_type="active"|"waiting"}`` and
  ``nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"}`` where the model
  exports them; Triton itself exports no per-model in-flight gauge (checked on 2.51).

Per GPU (label ``gpu_uuid``), where Triton exports them (not on a CPU-only server):
``nv_gpu_memory_used_bytes``, ``nv_gpu_memory_total_bytes``, ``nv_gpu_utilization``.
Triton refreshes these only every ``--metrics-interval-ms`` (2 s by default), so GPU
deltas carry a max age of 4x that interval, not 4x the scrape interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from .deltas import (
    Delta,
    DeltaSink,
    DeltaTracker,
    GpuStateDelta,
    ModelStateDelta,
    every,
    max_age,
)
from .prometheus import Labels, Samples, parse_samples

log = logging.getLogger("meshgate.adapters.triton_runtime")

PENDING = "nv_inference_pending_request_count"
EXEC_COUNT = "nv_inference_exec_count"
QUEUE_US = "nv_inference_queue_duration_us"
REQUEST_SUCCESS = "nv_inference_request_success"
TRTLLM_REQUESTS = "nv_trt_llm_request_metrics"
TRTLLM_KV_BLOCKS = "nv_trt_llm_kv_cache_block_metrics"
GPU_USED = "nv_gpu_memory_used_bytes"
GPU_TOTAL = "nv_gpu_memory_total_bytes"
GPU_UTILIZATION = "nv_gpu_utilization"
SCRAPED = (
    PENDING,
    EXEC_COUNT,
    QUEUE_US,
    REQUEST_SUCCESS,
    TRTLLM_REQUESTS,
    TRTLLM_KV_BLOCKS,
    GPU_USED,
    GPU_TOTAL,
    GPU_UTILIZATION,
)

# Triton's default --metrics-interval-ms: how often it refreshes its GPU metrics.
TRITON_GPU_METRICS_INTERVAL_S = 2.0


class ScrapeError(Exception):
    """The metrics endpoint could not be read; the message says why in one line."""


@dataclass
class _ModelTotals:
    """One model's samples of one scrape, summed over its versions."""

    pending: float = 0.0
    # None: the family is not exported for this model.
    exec_count: float | None = None
    queue_us: float | None = None
    completed: float | None = None
    active: float | None = None
    waiting: float | None = None
    kv_fraction: float | None = None


def _add(current: float | None, value: float) -> float:
    return value if current is None else current + value


def _label(labels: Labels, name: str) -> str | None:
    for key, value in labels:
        if key == name:
            return value
    return None


def _model_totals(samples: Samples) -> dict[str, _ModelTotals]:
    """Per-model totals, for the models that have a queue gauge (the loaded ones)."""
    models: dict[str, _ModelTotals] = {}
    loaded: set[str] = set()
    for (name, labels), value in samples.items():
        model = _label(labels, "model")
        if model is None or value != value:  # not per model, or NaN
            continue
        totals = models.setdefault(model, _ModelTotals())
        if name == PENDING:
            loaded.add(model)
            totals.pending += value
        elif name == EXEC_COUNT:
            totals.exec_count = _add(totals.exec_count, value)
        elif name == QUEUE_US:
            totals.queue_us = _add(totals.queue_us, value)
        elif name == REQUEST_SUCCESS:
            totals.completed = _add(totals.completed, value)
        elif name == TRTLLM_REQUESTS:
            kind = _label(labels, "request_type")
            if kind == "active":
                totals.active = _add(totals.active, value)
            elif kind == "waiting":
                totals.waiting = _add(totals.waiting, value)
        elif name == TRTLLM_KV_BLOCKS and _label(labels, "kv_cache_block_type") == "fraction":
            # Each version has its own cache: the fullest one is what limits.
            totals.kv_fraction = max(totals.kv_fraction or 0.0, min(max(value, 0.0), 1.0))
    return {model: totals for model, totals in models.items() if model in loaded}


def _gpu_readings(samples: Samples) -> dict[str, dict[str, Any]]:
    gpus: dict[str, dict[str, Any]] = {}
    fields = {GPU_USED: "vram_used_bytes", GPU_TOTAL: "vram_total_bytes"}
    for (name, labels), value in samples.items():
        if name not in (GPU_USED, GPU_TOTAL, GPU_UTILIZATION) or value != value:
            continue
        uuid = _label(labels, "gpu_uuid")
        if uuid is None:
            continue
        reading = gpus.setdefault(uuid, {})
        if name == GPU_UTILIZATION:
            reading["utilization"] = min(max(value, 0.0), 1.0)
        else:
            reading[fields[name]] = int(value)
    return gpus


def _count(value: float | None) -> int | None:
    return None if value is None else max(round(value), 0)


class TritonRuntimeAdapter:
    """Turns one backend's ``/metrics`` into ``ModelStateDelta``s and ``GpuStateDelta``s."""

    def __init__(
        self,
        backend_id: str,
        metrics_url: str,
        session: aiohttp.ClientSession,
        interval: float = 0.25,
        *,
        timeout: float = 2.0,
        gpu_metrics_interval: float = TRITON_GPU_METRICS_INTERVAL_S,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"scrape interval must be > 0, got {interval}")
        self.backend_id = backend_id
        self.metrics_url = metrics_url
        self.interval = interval
        self.model_max_age = max_age(interval)
        # A GPU reading is as old as Triton's own refresh of it, whatever our scrape rate.
        self.gpu_max_age = max_age(max(interval, gpu_metrics_interval))
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._tracker = DeltaTracker()
        # model -> (cumulative queue µs, cumulative completed requests) at the last scrape
        self._counters: dict[str, tuple[float, float]] = {}
        # every model seen since start, so one that vanishes can be reported not ready
        self._models: set[str] = set()

    async def scrape_once(self) -> list[Delta]:
        """One GET of the metrics endpoint, as deltas (a heartbeat for every model and GPU
        whose readings did not change). Raises ScrapeError if the endpoint cannot be read."""
        text = await self._fetch()
        observed_at = time.time()
        samples = parse_samples(text, SCRAPED)
        deltas: list[Delta] = []
        models = _model_totals(samples)
        for model, totals in models.items():
            changed = self._tracker.changes(
                ("model", model), self._model_observation(model, totals)
            )
            deltas.append(
                ModelStateDelta(self.backend_id, model, observed_at, self.model_max_age, **changed)
            )
        for model in self._models - models.keys():
            # Triton dropped the model's metrics: it was unloaded.
            self._counters.pop(model, None)
            changed = self._tracker.changes(("model", model), {"ready": False})
            if changed:
                deltas.append(
                    ModelStateDelta(
                        self.backend_id, model, observed_at, self.model_max_age, **changed
                    )
                )
        self._models |= models.keys()
        for uuid, reading in _gpu_readings(samples).items():
            changed = self._tracker.changes(("gpu", uuid), reading)
            deltas.append(
                GpuStateDelta(self.backend_id, uuid, observed_at, self.gpu_max_age, **changed)
            )
        return deltas

    async def run(self, sink: DeltaSink, stop: asyncio.Event) -> None:
        """Scrape every ``interval`` until ``stop`` is set, passing each delta to ``sink``.

        A failed scrape emits nothing (the backend's readings then age past their max
        age and count as saturated) and is logged once per streak of failures.
        """
        failing = False

        async def tick() -> None:
            nonlocal failing
            try:
                deltas = await self.scrape_once()
            except ScrapeError as exc:
                if not failing:
                    log.warning("backend %s: metrics scrape failed: %s", self.backend_id, exc)
                failing = True
                return
            if failing:
                log.info("backend %s: metrics scrape recovered", self.backend_id)
            failing = False
            for delta in deltas:
                sink(delta)

        await every(self.interval, stop, tick)

    async def _fetch(self) -> str:
        try:
            async with self._session.get(self.metrics_url, timeout=self._timeout) as reply:
                if reply.status != 200:
                    raise ScrapeError(f"GET {self.metrics_url}: HTTP {reply.status}")
                # The exposition format is UTF-8 by definition: no charset guessing.
                return (await reply.read()).decode("utf-8", errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ScrapeError(f"GET {self.metrics_url}: {type(exc).__name__}: {exc}") from exc

    def _model_observation(self, model: str, totals: _ModelTotals) -> dict[str, Any]:
        return {
            "queue_depth": _count(totals.pending),
            "in_flight": _count(totals.active),
            "queue_time_s": self._queue_time(model, totals),
            "exec_count": _count(totals.exec_count),
            "ready": True,
            "kv_cache_fraction": totals.kv_fraction,
            "waiting_requests": _count(totals.waiting),
        }

    def _queue_time(self, model: str, totals: _ModelTotals) -> float | None:
        """Average queue time of the requests completed since the last scrape (seconds)."""
        if totals.queue_us is None or totals.completed is None:
            self._counters.pop(model, None)
            return None
        previous = self._counters.get(model)
        self._counters[model] = (totals.queue_us, totals.completed)
        if previous is None:
            return None
        queued_us = totals.queue_us - previous[0]
        completed = totals.completed - previous[1]
        if queued_us < 0 or completed < 0:
            return None  # counters reset: Triton restarted
        if completed == 0:
            return 0.0 if totals.pending == 0 else None
        return queued_us / completed / 1e6
