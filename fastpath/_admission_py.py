# cython: annotation_typing=False
# (the hints are for readers and mypy; the C types come from the .pxd)
"""Admission control, written once: runs as plain Python, and is compiled as
``_admission_c`` with the C types of ``_admission_c.pxd``.

Every decision is O(1): admission never scans the fleet. Saturation is known from the
scorer, which runs first (ranking is cheap and does no upstream work): the caller
passes how many candidates ``Scorer.rank`` returned and ``Scorer.saturated``.

Counters live in int64/float64 arrays owned by the Admitter, one row per model plus a
last row for the whole gateway, so models and the global limit share one code path.
"""

import math  # compiled: libc.math, cimported by _admission_c.pxd
from dataclasses import dataclass

import numpy as np

from .state import (
    ADMIT,
    PRIORITY_CRITICAL,
    PRIORITY_SHEDDABLE,
    PRIORITY_STANDARD,
    REFUSE_NO_BACKEND,
    REFUSE_OVER_LIMIT,
    REFUSE_SATURATED,
)


@dataclass(frozen=True)
class AdmissionConfig:
    """Limits of the admitter. The defaults are the documented ones.

    A request is refused when the in-flight count (of the gateway, then of its model)
    has reached the limit of its priority class: critical the hard limit, standard the
    soft limit, sheddable ``sheddable_fraction`` of the soft limit (so it goes first).
    """

    max_inflight: int = 1024  # soft limit of the whole gateway
    max_inflight_hard: int = 1280  # hard limit of the whole gateway (critical only)
    model_max_inflight: int = 256  # soft limit of each model, unless set_model_limits
    model_max_inflight_hard: int = 320  # hard limit of each model
    sheddable_fraction: float = 0.75  # of a soft limit, where sheddable is refused
    drain_time_constant: float = 5.0  # seconds over which the drain rate is averaged
    retry_after_min: float = 1.0  # seconds, lower clamp of Retry-After
    retry_after_max: float = 60.0  # seconds, upper clamp (and the value with no drain seen)

    def __post_init__(self) -> None:
        _check_limits("max_inflight", self.max_inflight, self.max_inflight_hard)
        _check_limits("model_max_inflight", self.model_max_inflight, self.model_max_inflight_hard)
        if not 0.0 <= self.sheddable_fraction <= 1.0:
            raise ValueError(
                f"AdmissionConfig.sheddable_fraction: expected in [0, 1], "
                f"got {self.sheddable_fraction!r}"
            )
        if not 0.0 < self.drain_time_constant < math.inf:
            raise ValueError(
                f"AdmissionConfig.drain_time_constant: expected finite > 0, "
                f"got {self.drain_time_constant!r}"
            )
        if not 0.0 < self.retry_after_min <= self.retry_after_max < math.inf:
            raise ValueError(
                "AdmissionConfig.retry_after_min/max: expected 0 < min <= max < inf, "
                f"got {self.retry_after_min!r}, {self.retry_after_max!r}"
            )


def _check_limits(name: str, soft: int, hard: int) -> None:
    if not 0 < soft <= hard:
        raise ValueError(f"{name}: expected 0 < soft <= hard, got soft={soft!r}, hard={hard!r}")


class Admitter:
    """Admits or refuses requests in O(1) and counts what is in flight.

    Every ``admit`` that returns ADMIT must be matched by one ``release``.
    ``retry_after`` (seconds) is set by every refusal: the time for the requests ahead
    of this one to drain at the observed rate, clamped to the configured bounds.
    Not thread-safe: use one per event loop.
    """

    def __init__(self, config: AdmissionConfig, model_capacity: int) -> None:
        if model_capacity < 0:
            raise ValueError(f"model_capacity: expected >= 0, got {model_capacity!r}")
        self.model_capacity = model_capacity
        self.sheddable_fraction = float(config.sheddable_fraction)
        self.retry_after_min = float(config.retry_after_min)
        self.retry_after_max = float(config.retry_after_max)
        self._inv_tau = 1.0 / float(config.drain_time_constant)
        rows = model_capacity + 1  # the last row counts the whole gateway
        self._limits = np.empty((rows, 3), dtype=np.int64)
        for row in range(model_capacity):
            self._set_limits(row, config.model_max_inflight, config.model_max_inflight_hard)
        self._set_limits(model_capacity, config.max_inflight, config.max_inflight_hard)
        self._inflight = np.zeros(rows, dtype=np.int64)
        self._rate = np.zeros(rows, dtype=np.float64)  # completions/second at _rate_at
        self._rate_at = np.zeros(rows, dtype=np.float64)
        self.retry_after = 0.0

    def set_model_limits(self, model_index: int, soft: int, hard: int) -> None:
        """Override the soft and hard in-flight limits of one model."""
        self._check_model(model_index)
        _check_limits("model limits", soft, hard)
        self._set_limits(model_index, soft, hard)

    def _set_limits(self, row: int, soft: int, hard: int) -> None:
        """The limit of each priority class of ``row``, indexed by the PRIORITY_* ids."""
        self._limits[row, PRIORITY_CRITICAL] = hard
        self._limits[row, PRIORITY_STANDARD] = soft
        self._limits[row, PRIORITY_SHEDDABLE] = int(soft * self.sheddable_fraction)

    def inflight(self, model_index: int = -1) -> int:
        """Requests admitted and not yet released: of one model, or of all when -1."""
        if model_index == -1:
            return int(self._inflight[self.model_capacity])
        self._check_model(model_index)
        return int(self._inflight[model_index])

    def admit(
        self, model_index: int, priority: int, eligible: int, saturated: int, now: float
    ) -> int:
        """ADMIT (and count the request in flight), or the REFUSE_* reason.

        ``eligible``: what ``Scorer.rank`` returned for this request's candidates;
        ``saturated``: ``Scorer.saturated`` after that call; ``now``: time.monotonic().
        No eligible candidate means REFUSE_SATURATED when some were saturated or stale,
        else REFUSE_NO_BACKEND. Then the gateway limit and the model limit of the
        request's priority class are checked, in that order (REFUSE_OVER_LIMIT).
        """
        self._check_model(model_index)
        if not PRIORITY_CRITICAL <= priority <= PRIORITY_SHEDDABLE:
            raise ValueError(f"priority: expected one of state.PRIORITY_NAMES, got {priority!r}")
        if eligible <= 0:
            if saturated <= 0:
                self.retry_after = self.retry_after_min  # nothing to drain: readiness is polled
                return REFUSE_NO_BACKEND
            # Wait for what is in flight for the model to drain, then this request.
            self.retry_after = self._retry_after(model_index, self._inflight[model_index] + 1, now)
            return REFUSE_SATURATED
        everything = self.model_capacity
        if self._over_limit(everything, priority, now) or self._over_limit(
            model_index, priority, now
        ):
            return REFUSE_OVER_LIMIT
        self._inflight[everything] += 1
        self._inflight[model_index] += 1
        return ADMIT

    def release(self, model_index: int, now: float) -> None:
        """An admitted request finished: counters down, drain rates updated."""
        self._check_model(model_index)
        everything = self.model_capacity
        if self._inflight[model_index] <= 0:
            raise RuntimeError(f"release of model {model_index} without a matching admit")
        self._inflight[everything] -= 1
        self._inflight[model_index] -= 1
        self._completed(everything, now)
        self._completed(model_index, now)

    def _over_limit(self, row: int, priority: int, now: float) -> bool:
        """Whether ``row`` is at its limit for ``priority``; if so, sets retry_after."""
        excess = self._inflight[row] - self._limits[row, priority]
        if excess < 0:
            return False
        self.retry_after = self._retry_after(row, excess + 1, now)
        return True

    def _completed(self, row: int, now: float) -> None:
        """Count one completion in the drain rate of ``row``.

        The rate is an exponentially weighted average of completions per second:
        it decays by exp(-dt / tau) and each completion adds 1 / tau, so a steady
        rate r converges to r, and a stalled backend's rate falls toward 0.
        """
        dt = now - self._rate_at[row]
        if dt > 0.0:
            self._rate[row] *= math.exp(-dt * self._inv_tau)
            self._rate_at[row] = now
        self._rate[row] += self._inv_tau

    def _retry_after(self, row: int, waiting: int, now: float) -> float:
        """Seconds for ``waiting`` (>= 1) completions at the drain rate of ``row``, clamped."""
        rate = self._rate[row]
        dt = now - self._rate_at[row]
        if dt > 0.0:
            rate *= math.exp(-dt * self._inv_tau)
        # Compared without dividing, so a zero rate (nothing drained yet) gives the maximum.
        if waiting >= rate * self.retry_after_max:
            return self.retry_after_max
        return max(self.retry_after_min, waiting / rate)

    def _check_model(self, model_index: int) -> None:
        if not 0 <= model_index < self.model_capacity:
            raise IndexError(
                f"model_index: expected in [0, {self.model_capacity}), got {model_index!r}"
            )
