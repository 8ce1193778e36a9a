"""Routing: admission and scoring for one request, and the lease it holds while served.

Policy names from the config become ``fastpath.scoring`` policy ids once, at start;
per request the compiled scorer ranks the model's slots and the compiled admitter
decides, both in O(1) Python glue around the arrays.
"""

from __future__ import annotations

import time
from time import perf_counter_ns
from typing import TYPE_CHECKING

from fastpath import state as S
from fastpath.admission import Admitter
from fastpath.scoring import Scorer, affinity_hash

from .config import GatewayConfig, check_policy
from .errors import BadRequest, Overloaded, Unavailable
from .fleet import Backend, Fleet
from .outliers import OutlierDetector

if TYPE_CHECKING:
    from .auth import TenantClaim
    from .telemetry import Trail

PRIORITY_HEADER = "x-meshgate-priority"
# Keeps a conversation on one backend under prefix_affinity, instead of the prompt.
SESSION_HEADER = "x-meshgate-session"
# Bytes of the prompt (or session id) that decide prefix_affinity's home backend.
AFFINITY_PREFIX_BYTES = 256


def parse_priority(value: str | None) -> int:
    if value is None:
        return S.PRIORITY_STANDARD
    priority = S.PRIORITY_NAMES.get(value.strip().lower())
    if priority is None:
        raise BadRequest(
            f"{PRIORITY_HEADER} must be one of {sorted(S.PRIORITY_NAMES)}, got {value!r}"
        )
    return priority


class Router:
    def __init__(self, fleet: Fleet, config: GatewayConfig) -> None:
        self.fleet = fleet
        self.scorer = Scorer(config.scoring, fleet.state.array)
        self.admitter = Admitter(config.admission, model_capacity=config.max_slots)
        self.outliers = OutlierDetector(fleet, config.outlier)
        # Retries under way; bounded so that failover cannot multiply load in an outage.
        self.retries_active = 0
        self.retry_budget_fraction = config.retry_budget_fraction
        self.retry_budget_min = config.retry_budget_min
        self._default_policy = check_policy(config.policy, "policy")
        self._policies = {
            name: check_policy(settings.policy, f"models.{name}.policy")
            for name, settings in config.models.items()
            if settings.policy is not None
        }

    def policy_of(self, model: str) -> int:
        return self._policies.get(model, self._default_policy)

    def admit(
        self, model: str, version: str, priority: int, trail: Trail, affinity: bytes | None = None
    ) -> Lease:
        """Rank the model's slots and admit the request, or raise 429/503."""
        slots = self.fleet.candidates(model, version)
        policy = self.policy_of(model)
        key = 0
        if policy == S.POLICY_PREFIX_AFFINITY and affinity:
            key = affinity_hash(affinity, AFFINITY_PREFIX_BYTES)
        now = time.monotonic()
        started_ns = perf_counter_ns()
        eligible = self.scorer.rank(slots, policy, now, key)
        ranked_ns = perf_counter_ns()
        model_index = self.fleet.state.model_index[model]
        code = self.admitter.admit(model_index, priority, eligible, self.scorer.saturated, now)
        trail.decided(policy, started_ns, ranked_ns, perf_counter_ns())
        if code == S.ADMIT:
            return Lease(self, model_index, self.scorer.ranked[:eligible].tolist(), now, trail)
        reason = S.REASON_NAMES[code]
        trail.refused(reason)
        if code == S.REFUSE_NO_BACKEND:
            raise Unavailable(f"no backend has model '{model}' ready")
        raise Overloaded(
            f"model '{model}' is {reason.replace('_', ' ')}; retry later",
            reason=reason,
            retry_after=self.admitter.retry_after,
        )


class Lease:
    """An admitted request's claim on the fleet: the ranked slots to try in order, the
    in-flight count on the slot in use, and the admission slot, released by ``close``."""

    __slots__ = (
        "_current",
        "_first_at",
        "_later_responses",
        "_model_index",
        "_retrying",
        "_router",
        "_started",
        "slots",
        "tenant",
        "trail",
    )

    def __init__(
        self, router: Router, model_index: int, slots: list[int], started: float, trail: Trail
    ) -> None:
        self._router = router
        self.trail = trail
        # The tenant's hold on its limits (set by forward.admit), released with the lease.
        self.tenant: TenantClaim | None = None
        self._model_index = model_index
        self.slots = slots
        self._started = started
        self._current = -1
        self._first_at = 0.0  # monotonic time of the first response; 0: none yet
        self._later_responses = 0
        self._retrying = False

    def attempt(self, slot: int) -> Backend:
        """The backend of ``slot`` (one of ``slots``, best first) is tried now: in-flight
        moves to it from the one tried before."""
        self._leave()
        self._router.fleet.state.dispatched(slot)
        self._current = slot
        backend = self._router.fleet.backend_of(slot)
        self.trail.attempt(backend.id)
        return backend

    def may_retry(self) -> bool:
        """Take a retry from the budget: retries in flight stay within
        ``retry_budget_fraction`` of the requests in flight (at least
        ``retry_budget_min``; by default 20% and 3)."""
        router = self._router
        budget = max(
            router.retry_budget_min, router.retry_budget_fraction * router.admitter.inflight()
        )
        if self._retrying or router.retries_active >= budget:
            return False
        router.retries_active += 1
        self._retrying = True
        return True

    def model_gone(self) -> None:
        """The backend being tried does not have the model now: stop routing it there
        until discovery says otherwise."""
        if self._current >= 0:
            self._router.fleet.state.set_ready(self._current, False)

    def backend_ok(self) -> None:
        """The backend being tried answered: its consecutive-failure count resets, and a
        retry that got its answer gives its place in the budget back."""
        if self._retrying:
            self._retrying = False
            self._router.retries_active -= 1
        if self._current >= 0:
            self._router.outliers.succeeded(self._router.fleet.state.slot_keys[self._current][0])

    def backend_unreachable(self) -> None:
        """The backend being tried could not be reached: out of rotation at once, until
        a health probe answers (see OutlierDetector.unreachable)."""
        if self._current >= 0:
            self._router.outliers.unreachable(self._router.fleet.state.slot_keys[self._current][0])

    def backend_failed(self) -> None:
        """The backend being tried failed as a backend (unreachable, stalled)."""
        if self._current >= 0:
            self._router.outliers.failed(self._router.fleet.state.slot_keys[self._current][0])

    def elapsed(self) -> float:
        """Seconds since admission."""
        return time.monotonic() - self._started

    def first_response(self) -> None:
        """Record time to first response (first token) on the slot that served it."""
        if not self._first_at and self._current >= 0:
            self._first_at = time.monotonic()
            self._router.fleet.state.record_ttft(self._current, self._first_at - self._started)
            self.trail.first_response()

    def token(self) -> None:
        """One more streamed response after the first."""
        self._later_responses += 1
        self.trail.token()

    @property
    def charges_tokens(self) -> bool:
        """Whether the tokens generated are charged to a tenant (worth counting)."""
        return self.tenant is not None and self.tenant.charged

    def count_tokens(self, total: int) -> None:
        """The request has generated ``total`` tokens so far (charged to its tenant)."""
        if self.tenant is not None:
            self.tenant.count_tokens(total)

    def close(self) -> None:
        if self._retrying:
            self._router.retries_active -= 1
        self.trail.upstream_done()
        if self._later_responses and self._current >= 0:
            # Time per output token, over the stream (one clock read per request).
            per_token = (time.monotonic() - self._first_at) / self._later_responses
            self._router.fleet.state.record_tpot(self._current, per_token)
        self._leave()
        self._router.admitter.release(self._model_index, time.monotonic())
        if self.tenant is not None:
            self.tenant.close()

    def _leave(self) -> None:
        if self._current >= 0:
            self._router.fleet.state.finished(self._current)
            self._current = -1

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
