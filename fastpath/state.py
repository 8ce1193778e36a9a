"""Layout of the fleet state array, and the integer codes shared by the decision routines.

The fleet state is one C-contiguous float64 array of shape ``(capacity, NFIELDS)``.
A row is a *slot*: one (backend, model) deployment. The gateway's fleet writes the
rows; the scorer only reads them, and nothing but this array holds what it reads,
so with ``--workers N`` the array lives in shared memory unchanged (gateway/shared_fleet.py).

Codes are plain ints (not Enums) so the compiled twins compare C integers.
"""

import numpy as np

# Columns of the state array, one line each: what the value means and its "unknown".
QUEUE_DEPTH = 0  # requests waiting at the backend for this model (Triton's pending count)
INFLIGHT = 1  # requests this gateway has sent to the slot that have not finished
VRAM_USED = 2  # bytes of GPU memory in use on the backend
VRAM_TOTAL = 3  # bytes of GPU memory on the backend; 0 = unknown (no VRAM term, no VRAM filter)
KV_FRACTION = 4  # fraction of the KV cache in use, 0..1; NaN = not reported
TTFT_EWMA = 5  # seconds to first token, EWMA; NaN = no sample yet (scores as 0)
TPOT_EWMA = 6  # seconds per output token, EWMA; NaN = no sample yet (not scored)
READY = 7  # 1 = the model is loaded and ready on the backend; anything else = not
CIRCUIT_OPEN = 8  # 1 = the circuit breaker is open after failures; 0 = closed
DRAINING = 9  # 1 = cordoned: finishes its in-flight work but takes nothing new; 0 = serving
SIGNAL_AT = 10  # time.monotonic() of the newest signal; NaN = never signalled (stale)
MAX_AGE = 11  # seconds a signal stays fresh; older counts as saturated, not idle
WEIGHT = 12  # traffic share: 1.0 normal, (0, 1) while re-entering after ejection, <= 0 ejected
QUEUE_LIMIT = 13  # load, max(QUEUE_DEPTH, INFLIGHT), at which the slot saturates; <= 0: default
NFIELDS = 14

# Scoring policies.
POLICY_ROUND_ROBIN = 0
POLICY_LEAST_QUEUE = 1
POLICY_POWER_OF_TWO = 2
POLICY_HYBRID = 3
POLICY_PREFIX_AFFINITY = 4
POLICY_NAMES: dict[str, int] = {
    "round_robin": POLICY_ROUND_ROBIN,
    "least_queue": POLICY_LEAST_QUEUE,
    "power_of_two": POLICY_POWER_OF_TWO,
    "hybrid": POLICY_HYBRID,
    "prefix_affinity": POLICY_PREFIX_AFFINITY,
}

# Priority classes of a request (from a header); the ids index per-class limits.
PRIORITY_CRITICAL = 0
PRIORITY_STANDARD = 1
PRIORITY_SHEDDABLE = 2
PRIORITY_NAMES: dict[str, int] = {
    "critical": PRIORITY_CRITICAL,
    "standard": PRIORITY_STANDARD,
    "sheddable": PRIORITY_SHEDDABLE,
}

# Admission results: ADMIT, or the reason of a refusal.
ADMIT = 0
REFUSE_SATURATED = 1  # every candidate is saturated or stale: 429 with Retry-After
REFUSE_OVER_LIMIT = 2  # a global or per-model in-flight limit is reached: 429 with Retry-After
REFUSE_NO_BACKEND = 3  # no candidate is ready, closed-circuit and serving: 503
REASON_NAMES: dict[int, str] = {
    REFUSE_SATURATED: "saturated",
    REFUSE_OVER_LIMIT: "over_limit",
    REFUSE_NO_BACKEND: "no_backend",
}

# The two token buckets of each tenant (fastpath.tenants), indexing its per-bucket arrays.
BUCKET_REQUESTS = 0  # one unit per request; refills at requests_per_second
BUCKET_TOKENS = 1  # one unit per generated token; refills at tokens_per_minute / 60

# Tenant limiter results (fastpath.tenants): ADMIT, or which of the tenant's limits refused.
REFUSE_TENANT_RATE = 4  # the requests-per-second bucket is empty
REFUSE_TENANT_TOKENS = 5  # the tokens-per-minute bucket is empty (spent by earlier requests)
REFUSE_TENANT_CONCURRENCY = 6  # the tenant's concurrent-request limit is reached
TENANT_REASON_NAMES: dict[int, str] = {
    REFUSE_TENANT_RATE: "tenant_rate_limit",
    REFUSE_TENANT_TOKENS: "tenant_token_limit",
    REFUSE_TENANT_CONCURRENCY: "tenant_concurrency",
}


def new_state(capacity: int, buffer: memoryview | None = None) -> np.ndarray:
    """A state array of ``capacity`` empty slots: not ready, never signalled, weight 1.

    ``buffer``: memory to lay the array over (see ``state_view``); None: new memory.
    """
    state = np.empty((capacity, NFIELDS)) if buffer is None else state_view(capacity, buffer)
    state[:] = 0.0
    state[:, KV_FRACTION] = np.nan
    state[:, TTFT_EWMA] = np.nan
    state[:, TPOT_EWMA] = np.nan
    state[:, SIGNAL_AT] = np.nan
    state[:, WEIGHT] = 1.0
    return state


def state_view(capacity: int, buffer: memoryview) -> np.ndarray:
    """The state array of ``capacity`` slots laid over ``buffer`` (at least
    ``capacity * NFIELDS * 8`` bytes, e.g. a shared memory segment that several processes
    map), with whatever it holds: how a process attaches to an array another one made."""
    state = np.frombuffer(buffer, dtype=np.float64, count=capacity * NFIELDS)
    return state.reshape(capacity, NFIELDS)
