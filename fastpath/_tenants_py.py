# cython: annotation_typing=False
# (the hints are for readers and mypy; the C types come from the .pxd)
"""Per-tenant limits, written once: runs as plain Python, and is compiled as
``_tenants_c`` with the C types of ``_tenants_c.pxd``.

Each tenant has a concurrency counter and two token buckets, requests
(``requests_per_second``) and tokens (``tokens_per_minute``). Bucket state lives in
float64 arrays indexed by tenant id and bucket (``state.BUCKET_*``), so both buckets
share one code path and the compiled calls touch no Python objects.

A bucket holds at most ``capacity`` units (one second of requests, one minute of
tokens) and refills at ``rate`` units per second, lazily, from the time elapsed since
it was last touched. A request takes one unit of the requests bucket when admitted.
Tokens are charged as they are generated and may drive the tokens bucket below zero:
a stream in progress is never cut, its debt makes the tenant's next requests wait.
A bucket is empty when it holds less than one unit.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .state import (
    ADMIT,
    BUCKET_REQUESTS,
    BUCKET_TOKENS,
    REFUSE_TENANT_CONCURRENCY,
    REFUSE_TENANT_RATE,
    REFUSE_TENANT_TOKENS,
)

# Without a drain rate per tenant the wait for a concurrency slot is unknown: one
# second, the resolution of Retry-After.
CONCURRENCY_RETRY_AFTER = 1.0


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's limits; 0 means unlimited."""

    requests_per_second: float = 0.0
    max_concurrent: int = 0
    tokens_per_minute: float = 0.0

    def __post_init__(self) -> None:
        for name in ("requests_per_second", "max_concurrent", "tokens_per_minute"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"TenantLimits.{name}: expected a number, got {value!r}")
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"TenantLimits.{name}: expected finite >= 0, got {value!r}")
        if not float(self.max_concurrent).is_integer():
            raise ValueError(
                f"TenantLimits.max_concurrent: expected an integer, got {self.max_concurrent!r}"
            )


class TenantLimiter:
    """Admits or refuses a tenant's requests in O(1), and charges its tokens.

    Every ``admit`` that returns ADMIT must be matched by one ``release``.
    ``retry_after`` (seconds) is set by every refusal: when the refusing bucket will
    hold one unit again, or CONCURRENCY_RETRY_AFTER. ``now`` is time.monotonic().
    Not thread-safe: use one per event loop.
    """

    def __init__(self, limits: Sequence[TenantLimits]) -> None:
        tenants = len(limits)
        self.tenants = tenants
        self.retry_after = 0.0
        self._rate = np.zeros((tenants, 2), dtype=np.float64)  # units/second; 0: unlimited
        self._capacity = np.zeros((tenants, 2), dtype=np.float64)
        self._level = np.zeros((tenants, 2), dtype=np.float64)
        self._at = np.zeros((tenants, 2), dtype=np.float64)  # when _level was last refilled
        self._max_concurrent = np.zeros(tenants, dtype=np.int64)  # 0: unlimited
        self._inflight = np.zeros(tenants, dtype=np.int64)
        for tenant, limit in enumerate(limits):
            rps = float(limit.requests_per_second)
            tpm = float(limit.tokens_per_minute)
            # A burst of one second's requests; below 1/s, one request at a time.
            self._rate[tenant, BUCKET_REQUESTS] = rps
            self._capacity[tenant, BUCKET_REQUESTS] = max(1.0, rps) if rps > 0 else 0.0
            self._rate[tenant, BUCKET_TOKENS] = tpm / 60.0
            self._capacity[tenant, BUCKET_TOKENS] = tpm
            self._max_concurrent[tenant] = int(limit.max_concurrent)
        self._level[:, :] = self._capacity  # buckets start full

    def admit(self, tenant: int, now: float) -> int:
        """ADMIT (taking one request unit and a concurrency slot), or the REFUSE_TENANT_*
        reason. Checked in order: concurrency, requests bucket, tokens bucket."""
        self._check(tenant)
        limit = self._max_concurrent[tenant]
        if limit > 0 and self._inflight[tenant] >= limit:
            self.retry_after = CONCURRENCY_RETRY_AFTER
            return REFUSE_TENANT_CONCURRENCY
        if self._empty(tenant, BUCKET_REQUESTS, now):
            return REFUSE_TENANT_RATE
        if self._empty(tenant, BUCKET_TOKENS, now):
            return REFUSE_TENANT_TOKENS
        if self._rate[tenant, BUCKET_REQUESTS] > 0.0:
            self._level[tenant, BUCKET_REQUESTS] -= 1.0
        self._inflight[tenant] += 1
        return ADMIT

    def release(self, tenant: int) -> None:
        """An admitted request finished: its concurrency slot is free."""
        self._check(tenant)
        if self._inflight[tenant] <= 0:
            raise RuntimeError(f"release of tenant {tenant} without a matching admit")
        self._inflight[tenant] -= 1

    def charge_tokens(self, tenant: int, tokens: float, now: float) -> None:
        """Take ``tokens`` (>= 0) generated tokens from the tenant's budget, even past empty."""
        self._check(tenant)
        if not tokens >= 0.0:
            raise ValueError(f"tokens: expected >= 0, got {tokens!r}")
        if self._rate[tenant, BUCKET_TOKENS] > 0.0:
            self._refill(tenant, BUCKET_TOKENS, now)
            self._level[tenant, BUCKET_TOKENS] -= tokens

    def inflight(self, tenant: int) -> int:
        """The tenant's requests admitted and not yet released."""
        self._check(tenant)
        return int(self._inflight[tenant])

    def limit(self, tenant: int, bucket: int) -> float:
        """Capacity of the bucket: requests per second (at least 1) or tokens per
        minute; 0 when that limit is off."""
        self._check(tenant)
        self._check_bucket(bucket)
        return float(self._capacity[tenant, bucket])

    def remaining(self, tenant: int, bucket: int, now: float) -> float:
        """Units in the bucket now, 0 when it is in debt (and when the limit is off)."""
        self._check(tenant)
        self._check_bucket(bucket)
        self._refill(tenant, bucket, now)
        return max(0.0, float(self._level[tenant, bucket]))

    def reset(self, tenant: int, bucket: int, now: float) -> float:
        """Seconds until the bucket is full again (0 when the limit is off)."""
        self._check(tenant)
        self._check_bucket(bucket)
        rate = self._rate[tenant, bucket]
        if rate <= 0.0:
            return 0.0
        self._refill(tenant, bucket, now)
        return float(self._capacity[tenant, bucket] - self._level[tenant, bucket]) / rate

    def _empty(self, tenant: int, bucket: int, now: float) -> bool:
        """Whether the bucket holds less than one unit; if so, sets retry_after."""
        rate = self._rate[tenant, bucket]
        if rate <= 0.0:
            return False
        self._refill(tenant, bucket, now)
        level = self._level[tenant, bucket]
        if level >= 1.0:
            return False
        self.retry_after = (1.0 - level) / rate
        return True

    def _refill(self, tenant: int, bucket: int, now: float) -> None:
        dt = now - self._at[tenant, bucket]
        if dt > 0.0:
            level = self._level[tenant, bucket] + dt * self._rate[tenant, bucket]
            self._level[tenant, bucket] = min(level, self._capacity[tenant, bucket])
            self._at[tenant, bucket] = now

    def _check(self, tenant: int) -> None:
        if not 0 <= tenant < self.tenants:
            raise IndexError(f"tenant: expected in [0, {self.tenants}), got {tenant!r}")

    def _check_bucket(self, bucket: int) -> None:
        if bucket != BUCKET_REQUESTS and bucket != BUCKET_TOKENS:
            raise ValueError(f"bucket: expected BUCKET_REQUESTS or BUCKET_TOKENS, got {bucket!r}")
