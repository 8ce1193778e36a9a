"""Signal-plane deltas: what changed about one model or one GPU of one backend.

A delta names its key (backend + model, or backend + GPU uuid), when it was observed
(``observed_at``, wall-clock ``time.time()`` seconds, since sidecars send deltas from
other hosts) and how long its source's readings stay trustworthy (``max_age``, seconds:
``max_age(interval)`` for a source refreshed every ``interval``).
Every other field is ``None`` unless it changed since the previous observation of that
key; a delta with no changed field is a heartbeat that only says "still true as of
``observed_at``", which is what keeps a quiet backend from going stale.

Applying deltas: fields are absolute values, never increments, so applying one delta
twice changes nothing (idempotent). Deltas can arrive out of order (several sidecars,
retried pushes), so the receiver keeps an :class:`AppliedClock` and applies a delta only
if it is newer than the newest one already applied for the same key.

Deltas cross HTTP as JSON objects (``to_json``/``delta_from_json``); parsing validates
every field and raises ``ValueError`` naming the field, what was expected and what came.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeAlias

# A reading is trusted for STALE_AFTER_INTERVALS of its source's refresh intervals and
# for at least MIN_MAX_AGE_S: a reading refreshed often is not wrong sooner, and a loaded
# host can delay a scrape or a sidecar's push by a few hundred milliseconds (a Triton
# scrape every 0.1 s was trusted for 0.4 s, and such a delay refused every request as
# "saturated": a stale signal counts as saturated).
STALE_AFTER_INTERVALS = 4.0
MIN_MAX_AGE_S = 1.0
MODEL_KIND = "model"
GPU_KIND = "gpu"


def max_age(refresh_interval: float) -> float:
    """How long a reading refreshed every ``refresh_interval`` seconds is trusted."""
    return max(STALE_AFTER_INTERVALS * refresh_interval, MIN_MAX_AGE_S)


@dataclass(frozen=True, slots=True)
class ModelStateDelta:
    """What changed about ``model`` on ``backend`` (all versions of the model together)."""

    kind: ClassVar[str] = MODEL_KIND

    backend: str
    model: str
    observed_at: float
    max_age: float
    # Requests waiting in Triton's queue (nv_inference_pending_request_count).
    queue_depth: int | None = None
    # Requests being executed, where the backend exports it (TRT-LLM "active" requests).
    in_flight: int | None = None
    # Average time a request spent queued, over the requests that completed recently.
    queue_time_s: float | None = None
    # Cumulative model executions (nv_inference_exec_count).
    exec_count: int | None = None
    # Whether the backend has the model loaded.
    ready: bool | None = None
    # TRT-LLM KV-cache blocks in use, 0..1 (kv_cache_block_type="fraction").
    kv_cache_fraction: float | None = None
    # TRT-LLM requests waiting for a batch slot (request_type="waiting").
    waiting_requests: int | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (MODEL_KIND, self.backend, self.model)

    def changes(self) -> dict[str, Any]:
        """The changed fields (the non-None state fields), by name."""
        return _changes(self)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


@dataclass(frozen=True, slots=True)
class GpuStateDelta:
    """What changed about the GPU ``gpu`` (its NVML uuid) of ``backend``."""

    kind: ClassVar[str] = GPU_KIND

    backend: str
    gpu: str
    observed_at: float
    max_age: float
    vram_used_bytes: int | None = None
    vram_total_bytes: int | None = None
    # Fraction of the last sample period the GPU was busy, 0..1.
    utilization: float | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (GPU_KIND, self.backend, self.gpu)

    def changes(self) -> dict[str, Any]:
        """The changed fields (the non-None state fields), by name."""
        return _changes(self)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


Delta: TypeAlias = ModelStateDelta | GpuStateDelta
# Where an adapter hands each delta; what it returns is ignored, so both
# FleetState.apply (applied or not) and list.append fit.
DeltaSink: TypeAlias = Callable[[Delta], object]

_IDENTITY = frozenset({"backend", "model", "gpu", "observed_at", "max_age"})


def _changes(delta: Delta) -> dict[str, Any]:
    return {
        f.name: value
        for f in fields(delta)
        if f.name not in _IDENTITY and (value := getattr(delta, f.name)) is not None
    }


def _to_json(delta: Delta) -> dict[str, Any]:
    """An orjson/json-ready dict: identity fields plus the changed fields only."""
    out: dict[str, Any] = {"kind": delta.kind}
    for f in fields(delta):
        value = getattr(delta, f.name)
        if value is not None:
            out[f.name] = value
    return out


# -- validation -----------------------------------------------------------------------

Check: TypeAlias = Callable[[Any], bool]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _name(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _timestamp(value: Any) -> bool:
    return _is_number(value) and value > 0


def _positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _non_negative(value: Any) -> bool:
    return _is_number(value) and value >= 0


def _fraction(value: Any) -> bool:
    return _is_number(value) and 0 <= value <= 1


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


_EXPECTED: dict[Check, str] = {
    _name: "a non-empty string",
    _timestamp: "a positive finite number (seconds since the epoch)",
    _positive: "a positive finite number",
    _count: "a non-negative integer",
    _non_negative: "a non-negative finite number",
    _fraction: "a number in [0, 1]",
    _flag: "a boolean",
}

# field -> check; the first four of each are required, the rest optional (null = unchanged).
_SCHEMAS: dict[str, tuple[type[Delta], dict[str, Check]]] = {
    MODEL_KIND: (
        ModelStateDelta,
        {
            "backend": _name,
            "model": _name,
            "observed_at": _timestamp,
            "max_age": _positive,
            "queue_depth": _count,
            "in_flight": _count,
            "queue_time_s": _non_negative,
            "exec_count": _count,
            "ready": _flag,
            "kv_cache_fraction": _fraction,
            "waiting_requests": _count,
        },
    ),
    GPU_KIND: (
        GpuStateDelta,
        {
            "backend": _name,
            "gpu": _name,
            "observed_at": _timestamp,
            "max_age": _positive,
            "vram_used_bytes": _count,
            "vram_total_bytes": _count,
            "utilization": _fraction,
        },
    ),
}
_REQUIRED = 4


def _describe(value: Any) -> str:
    text = repr(value)
    shown = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {shown}"


def delta_from_json(obj: Any, path: str = "$") -> Delta:
    """Build a delta from a ``to_json`` dict; raises ValueError saying what is wrong where."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a delta object, got {_describe(obj)} - at {path}")
    kind = obj.get("kind")
    if kind not in _SCHEMAS:
        raise ValueError(
            f"expected `kind` to be {MODEL_KIND!r} or {GPU_KIND!r}, "
            f"got {_describe(kind)} - at {path}.kind"
        )
    cls, schema = _SCHEMAS[kind]
    unknown = sorted(str(k) for k in obj if k != "kind" and k not in schema)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown} - at {path}")
    values: dict[str, Any] = {}
    for index, (name, check) in enumerate(schema.items()):
        value = obj.get(name)
        if value is None:
            if index < _REQUIRED:
                raise ValueError(f"{cls.__name__}: missing required `{name}` - at {path}")
            continue
        if not check(value):
            raise ValueError(
                f"{cls.__name__}: expected `{name}` to be {_EXPECTED[check]}, "
                f"got {_describe(value)} - at {path}.{name}"
            )
        values[name] = value
    return cls(**values)


def deltas_from_json(obj: Any) -> list[Delta]:
    """Parse a pushed batch, ``{"deltas": [delta, ...]}``, as the sidecar sends it."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("deltas"), list):
        raise ValueError(f'expected {{"deltas": [...]}}, got {_describe(obj)} - at $')
    return [delta_from_json(item, f"$.deltas[{i}]") for i, item in enumerate(obj["deltas"])]


def batch_to_json(deltas: list[Delta]) -> dict[str, Any]:
    """The body the sidecar pushes; ``deltas_from_json`` reads it back."""
    return {"deltas": [d.to_json() for d in deltas]}


# -- producing and applying -----------------------------------------------------------


class DeltaTracker:
    """Remembers the last full observation per key and reports only what changed.

    Both adapters use it, so "a delta carries only what changed" is decided here once.
    A value of ``None`` in an observation means "not measured" and is never a change.
    """

    def __init__(self) -> None:
        self._last: dict[Hashable, dict[str, Any]] = {}

    def changes(self, key: Hashable, observation: Mapping[str, Any]) -> dict[str, Any]:
        """Fields of ``observation`` that differ from the previous one of ``key``
        (all measured fields the first time), and remember them."""
        last = self._last.setdefault(key, {})
        changed = {
            name: value
            for name, value in observation.items()
            if value is not None and last.get(name) != value
        }
        last.update(changed)
        return changed

    def keys(self) -> list[Hashable]:
        """Keys observed since the last ``resync``."""
        return list(self._last)

    def forget(self, key: Hashable) -> None:
        self._last.pop(key, None)

    def resync(self) -> None:
        """Forget everything, so the next observation of each key is reported in full
        (after a receiver may have lost state, e.g. a failed push to a restarted gateway)."""
        self._last.clear()


class Ticks:
    """The multiples of ``period`` on the loop's clock (the monotonic clock, the same
    in every process): periodic work that waits for them wakes together, in one wake-up
    of the process and of the CPU, instead of each timer waking it on its own. Measured
    here, an idle uvloop process woken 20 times a second costs 0.28% of a core
    (~140 CPU-µs per wake-up); the gateway's timers (loop lag, fleet layout, publishing,
    supervision, scrapes) mostly have periods that are multiples of 50 ms."""

    __slots__ = ("_next", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self._next = 0.0

    def delay(self, now: float) -> float:
        """Seconds from ``now`` to the next tick after the last one handed out: a timer
        that fired a millisecond early is not given the same tick again, and ticks
        missed while the loop was held are skipped."""
        following = (now // self.period + 1) * self.period
        self._next = max(self._next + self.period, following)
        return self._next - now


async def every(interval: float, stop: asyncio.Event, tick: Callable[[], Awaitable[None]]) -> None:
    """Await ``tick()`` at once, then at each multiple of ``interval`` on the loop's
    clock (``Ticks``), until ``stop`` is set; a tick that overruns is followed by the
    next at the following multiple. The adapters' run loop."""
    loop = asyncio.get_running_loop()
    ticks = Ticks(interval)
    while not stop.is_set():
        await tick()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ticks.delay(loop.time())):
                await stop.wait()


class AppliedClock:
    """The receiver's side of ordering: newest ``observed_at`` applied per delta key."""

    def __init__(self) -> None:
        self._newest: dict[tuple[str, str, str], float] = {}

    def admit(self, delta: Delta) -> bool:
        """True, and record it, if ``delta`` is newer than every delta applied for its key;
        False for an older or repeated one, which the caller must drop."""
        newest = self._newest.get(delta.key)
        if newest is not None and delta.observed_at <= newest:
            return False
        self._newest[delta.key] = delta.observed_at
        return True

    def newest(self, delta_key: tuple[str, str, str]) -> float | None:
        """When the newest applied delta of ``delta_key`` was observed, if any was."""
        return self._newest.get(delta_key)
