# cython: annotation_typing=False
# (the hints are for readers and mypy; the C types come from the .pxd)
"""Backend scoring, written once: runs as plain Python, and is compiled as ``_scoring_c``
with the C types of ``_scoring_c.pxd`` (aiohttp's reader_py/reader_c pattern).

Every policy first applies the same hard filters to each candidate slot:

- *unavailable* (never eligible): READY != 1, CIRCUIT_OPEN != 0, DRAINING != 0, WEIGHT <= 0;
- *saturated* (not eligible, counted in ``Scorer.saturated``): the signal is stale
  (``now - SIGNAL_AT > MAX_AGE``, or never signalled), the slot's *load* has reached its
  queue limit, or VRAM_USED / VRAM_TOTAL is above ``vram_saturation``.

A slot's load is max(QUEUE_DEPTH, INFLIGHT): Triton's queue counts the requests this
gateway sent that wait there, so adding the two would count those twice (a single
client at 32 concurrent requests was refused "saturated" at the default limit of 32);
the larger of the two is exact when the gateway is Triton's only client and a lower
bound otherwise.

The remaining *eligible* slots are ordered by the policy (see ``Scorer.rank``).
Keep this file plain Python: no imports of Cython beyond the ``nogil`` shim below.
"""

from dataclasses import dataclass

import numpy as np

try:
    from cython import nogil as _nogil
except ImportError:  # plain Python without Cython installed: releasing the GIL is a no-op
    from contextlib import nullcontext as _nogil

from .state import (
    CIRCUIT_OPEN,
    DRAINING,
    INFLIGHT,
    KV_FRACTION,
    MAX_AGE,
    NFIELDS,
    POLICY_LEAST_QUEUE,
    POLICY_POWER_OF_TWO,
    POLICY_PREFIX_AFFINITY,
    POLICY_ROUND_ROBIN,
    QUEUE_DEPTH,
    QUEUE_LIMIT,
    READY,
    SIGNAL_AT,
    TTFT_EWMA,
    VRAM_TOTAL,
    VRAM_USED,
    WEIGHT,
)

# Python ints are unbounded: every 64-bit product and left shift is masked so both
# twins compute the same bits (in C the mask is a no-op on unsigned long long).
_MASK64 = 0xFFFFFFFFFFFFFFFF
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: splitmix64's increment
_MIX_1 = 0xBF58476D1CE4E5B9  # splitmix64 finalizer constants
_MIX_2 = 0x94D049BB133111EB
_XORSHIFT_MULT = 0x2545F4914F6CDD1D  # xorshift64* output multiplier

# Candidate lists at least this long are ranked with the GIL released (~2 µs of work at
# 256 here). Releasing costs ~30 ns uncontended, but a waiting thread may then keep the
# GIL for a switch interval, so short rankings on the event loop keep it.
NOGIL_MIN_CANDIDATES = 256


@dataclass(frozen=True)
class ScoringConfig:
    """Weights and thresholds of the scorer. The defaults are the documented ones.

    The hybrid score of an eligible slot (lower is better) is::

        ( queue_weight * max(QUEUE_DEPTH, INFLIGHT) / queue limit
        + vram_weight  * VRAM_USED / VRAM_TOTAL      (0 when VRAM_TOTAL is unknown)
        + kv_weight    * KV_FRACTION                 (0 when not reported)
        + ttft_weight  * TTFT_EWMA / ttft_scale      (0 before the first sample)
        ) / WEIGHT

    where the queue limit is the slot's QUEUE_LIMIT, or ``queue_saturation`` when unset.
    """

    queue_weight: float = 1.0
    vram_weight: float = 0.5
    kv_weight: float = 0.5
    ttft_weight: float = 0.5
    ttft_scale: float = 1.0  # seconds of TTFT that weigh as much as a full queue
    vram_saturation: float = 0.95  # VRAM_USED / VRAM_TOTAL above this is saturated
    queue_saturation: float = 32.0  # default queue limit (of the load, see above)

    def __post_init__(self) -> None:
        for name in ("queue_weight", "vram_weight", "kv_weight", "ttft_weight"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f"ScoringConfig.{name}: expected >= 0, got {value!r}")
        if not self.ttft_scale > 0.0:
            raise ValueError(f"ScoringConfig.ttft_scale: expected > 0, got {self.ttft_scale!r}")
        if not 0.0 < self.vram_saturation <= 1.0:
            raise ValueError(
                f"ScoringConfig.vram_saturation: expected in (0, 1], got {self.vram_saturation!r}"
            )
        if not 0.0 < self.queue_saturation < float("inf"):
            raise ValueError(
                "ScoringConfig.queue_saturation: expected finite > 0, "
                f"got {self.queue_saturation!r}"
            )


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection that spreads every input bit over the output."""
    x = ((x ^ (x >> 30)) * _MIX_1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX_2) & _MASK64
    return x ^ (x >> 31)


def affinity_hash(data: bytes | bytearray | memoryview, k: int) -> int:
    """FNV-1a 64 of the first ``k`` bytes of ``data`` (any contiguous bytes-like object).

    Stable across processes and versions, so a conversation keeps its key everywhere.
    """
    h = _FNV_OFFSET
    n = min(len(data), k)
    for i in range(n):
        h = ((h ^ data[i]) * _FNV_PRIME) & _MASK64
    return h


class Scorer:
    """Ranks the candidate slots of a model by policy.

    ``state``: the fleet state array, float64, C-contiguous, shape (capacity, NFIELDS)
    (see ``state.py``). ``max_ranked``: the length of ``ranked``, the choice plus the
    retry fallbacks. The scorer keeps both arrays for its lifetime: acquiring a buffer
    costs more than scoring 64 slots, so only ``candidates`` is acquired per call.
    Holds when round_robin last chose each slot and an xorshift64* generator, so a
    sequence of calls is deterministic given the seed (both twins produce identical
    results).
    Not thread-safe: use one per event loop.
    """

    def __init__(
        self, config: ScoringConfig, state: np.ndarray, seed: int = 0, max_ranked: int = 3
    ) -> None:
        if state.ndim != 2 or state.shape[1] < NFIELDS:
            raise ValueError(f"state: expected shape (capacity, {NFIELDS}), got {state.shape}")
        if max_ranked < 1:
            raise ValueError(f"max_ranked: expected >= 1, got {max_ranked!r}")
        self._state = state
        # ``ranked`` is for callers; ``_ranked`` is the same buffer, typed for the C twin.
        self.ranked = np.full(max_ranked, -1, dtype=np.int32)
        self._ranked = self.ranked
        self.queue_weight = float(config.queue_weight)
        self.vram_weight = float(config.vram_weight)
        self.kv_weight = float(config.kv_weight)
        self.ttft_factor = float(config.ttft_weight) / float(config.ttft_scale)
        self.vram_saturation = float(config.vram_saturation)
        self.queue_saturation = float(config.queue_saturation)
        rng = _mix64((seed + _GOLDEN) & _MASK64)
        self._rng = rng if rng != 0 else 1  # xorshift's only fixed point is 0
        # Round-robin turns, per slot: a slot belongs to one model, so one model's
        # rotation never depends on another's traffic. 0 = never chosen.
        self._turn = 0
        self._chosen_at = np.zeros(state.shape[0], dtype=np.float64)
        self._slots = np.empty(64, dtype=np.int32)
        self._keys = np.empty(64, dtype=np.float64)
        self.saturated = 0

    def rank(self, candidates: np.ndarray, policy: int, now: float, affinity_key: int) -> int:
        """Write the best eligible candidate slots, best first, to ``ranked``; return how many.

        ``candidates``: int32 slots that serve the model; ``now``: time.monotonic();
        ``affinity_key``: an unsigned 64-bit int from ``affinity_hash`` (read by prefix_affinity).
        Returns ``min(eligible, max_ranked)``: ``ranked[0]`` is the choice, the rest are
        retry fallbacks, valid until the next call (copy them to keep them). 0 means
        none is eligible; then ``saturated`` (candidates refused as saturated or
        stale, set by every call) tells "saturated" from "no backend".
        Costs O(len(candidates)) for a small ``max_ranked``.

        Policies (ties are broken by scanning from a seeded random start):
        round_robin: the eligible slot chosen least recently by round_robin first (so
        each model's eligible slots take turns), then the next least recent.
        least_queue: lowest max(QUEUE_DEPTH, INFLIGHT) / WEIGHT first.
        power_of_two: two random eligible slots; the lower hybrid score is first,
        the other second, the rest by hybrid score.
        hybrid: lowest hybrid score first (see ScoringConfig).
        prefix_affinity: rendezvous hashing of ``affinity_key`` over the available
        slots picks a home slot, first when eligible; the rest (or all, when the home
        is saturated) by hybrid score.
        """
        if not POLICY_ROUND_ROBIN <= policy <= POLICY_PREFIX_AFFINITY:
            raise ValueError(f"policy: expected one of state.POLICY_NAMES, got {policy!r}")
        n = candidates.shape[0]
        if n > self._slots.shape[0]:
            self._slots = np.empty(n, dtype=np.int32)
            self._keys = np.empty(n, dtype=np.float64)
        if n >= NOGIL_MIN_CANDIDATES:
            with _nogil(True):  # the call form works compiled, with Cython's shadow and without
                count = self._rank(candidates, policy, now, affinity_key)
        else:
            count = self._rank(candidates, policy, now, affinity_key)
        if count < 0:
            raise IndexError(
                f"candidates[{-1 - count}]: expected a slot in [0, {self._state.shape[0]}), "
                f"got {candidates[-1 - count]}"
            )
        return count

    def _rank(self, candidates: np.ndarray, policy: int, now: float, affinity_key: int) -> int:
        """rank() without the checks: returns the count, or -1 - i for a bad candidates[i]."""
        state = self._state
        n = candidates.shape[0]
        rows = state.shape[0]
        slots = self._slots
        keys = self._keys
        start = 0
        if policy != POLICY_ROUND_ROBIN and n > 0:
            start = self._next_random() % n
        eligible = 0
        saturated = 0
        have_home = False
        home_hash = 0
        home_pos = -1
        for j in range(n):
            i = start + j
            if i >= n:
                i -= n
            s = int(candidates[i])  # plain twin: a Python int, so 64-bit hashing cannot overflow
            if s < 0 or s >= rows:
                return -1 - i
            weight = state[s, WEIGHT]
            if not (
                state[s, READY] == 1.0
                and state[s, CIRCUIT_OPEN] == 0.0
                and state[s, DRAINING] == 0.0
                and weight > 0.0
            ):
                continue
            is_home = False
            if policy == POLICY_PREFIX_AFFINITY:
                h = _mix64(affinity_key ^ _mix64(s))
                if not have_home or h > home_hash:
                    have_home = True
                    home_hash = h
                    home_pos = -1
                    is_home = True
            load = state[s, QUEUE_DEPTH]
            if state[s, INFLIGHT] > load:  # the larger; a NaN queue depth stays NaN
                load = state[s, INFLIGHT]
            limit = self._limit(s)
            vram = self._vram(s)
            # Written so that NaN (never signalled, unreadable) fails each test: unknown
            # state counts as saturated, never as idle.
            if not (
                now - state[s, SIGNAL_AT] <= state[s, MAX_AGE]
                and load < limit
                and vram <= self.vram_saturation
            ):
                saturated += 1
                continue
            if policy == POLICY_LEAST_QUEUE:
                key = load
            else:
                key = self._score(load / limit, vram, state[s, KV_FRACTION], state[s, TTFT_EWMA])
            key /= weight
            if key != key:  # a NaN score (e.g. inf * 0 weight) is as unusable as a stale signal
                saturated += 1
                continue
            if is_home:
                home_pos = eligible
            slots[eligible] = s
            keys[eligible] = key
            eligible += 1
        self.saturated = saturated
        count = min(eligible, self._ranked.shape[0])
        if count == 0:
            return 0
        first = 0
        if policy == POLICY_ROUND_ROBIN:
            for i in range(eligible):
                keys[i] = self._chosen_at[slots[i]]
        elif policy == POLICY_POWER_OF_TWO and eligible >= 2:
            r = self._next_random()
            a = r % eligible
            b = (a + 1 + (r >> 32) % (eligible - 1)) % eligible
            if keys[b] < keys[a]:  # the better of the two wins; a tie goes to the first drawn
                a, b = b, a
            self._swap(0, a)
            if b == 0:
                b = a
            self._swap(1, b)
            first = 2
        elif policy == POLICY_PREFIX_AFFINITY and home_pos >= 0:
            self._swap(0, home_pos)
            first = 1
        self._select(first, count, eligible)
        for i in range(count):
            self._ranked[i] = slots[i]
        if policy == POLICY_ROUND_ROBIN:
            self._turn += 1
            self._chosen_at[slots[0]] = self._turn
        return count

    def score(self, slot: int) -> float:
        """The hybrid score of ``slot`` as ``rank`` weighs it (lower is better), whatever
        the hard filters say: what operators see next to the ranking in /admin/fleet."""
        if slot < 0 or slot >= self._state.shape[0]:
            raise IndexError(f"slot {slot} is outside the state array")
        state = self._state
        load = state[slot, QUEUE_DEPTH]
        if state[slot, INFLIGHT] > load:  # the larger; a NaN queue depth stays NaN
            load = state[slot, INFLIGHT]
        key = self._score(
            load / self._limit(slot),
            self._vram(slot),
            state[slot, KV_FRACTION],
            state[slot, TTFT_EWMA],
        )
        return float(key / state[slot, WEIGHT])

    def _limit(self, s: int) -> float:
        """Queue depth + in-flight at which the slot is saturated."""
        limit = self._state[s, QUEUE_LIMIT]
        return limit if limit > 0.0 else self.queue_saturation

    def _vram(self, s: int) -> float:
        """Fraction of VRAM in use; 0 when the total is unknown."""
        total = self._state[s, VRAM_TOTAL]
        return self._state[s, VRAM_USED] / total if total > 0.0 else 0.0

    def _score(self, queue: float, vram: float, kv: float, ttft: float) -> float:
        """The hybrid score before the WEIGHT division (see ScoringConfig); NaN = absent."""
        if kv != kv:
            kv = 0.0
        if ttft != ttft:
            ttft = 0.0
        return (
            self.queue_weight * queue
            + self.vram_weight * vram
            + self.kv_weight * kv
            + self.ttft_factor * ttft
        )

    def _next_random(self) -> int:
        """Next xorshift64* output (Vigna 2016): fast, and identical in both twins."""
        x = self._rng
        x ^= x >> 12
        x ^= (x << 25) & _MASK64
        x ^= x >> 27
        self._rng = x
        return (x * _XORSHIFT_MULT) & _MASK64

    def _select(self, first: int, stop: int, eligible: int) -> None:
        """Put the lowest keys of [first, eligible) into [first, stop), lowest first.

        One pass keeping a sorted top list: O(eligible) when the list is short, since
        most entries lose the single comparison with its current last. Ties keep scan
        order.
        """
        if stop <= first:
            return
        slots = self._slots
        keys = self._keys
        for j in range(first + 1, eligible):
            key = keys[j]
            if j < stop:
                i = j  # still filling the top list: plain insertion
            elif key < keys[stop - 1]:
                i = stop - 1  # the last of the top list drops out
            else:
                continue
            slot = slots[j]
            while i > first and key < keys[i - 1]:
                slots[i] = slots[i - 1]
                keys[i] = keys[i - 1]
                i -= 1
            slots[i] = slot
            keys[i] = key

    def _swap(self, i: int, j: int) -> None:
        """Exchange positions i and j of the eligible slots and their keys."""
        slots = self._slots
        keys = self._keys
        slot = slots[i]
        key = keys[i]
        slots[i] = slots[j]
        keys[i] = keys[j]
        slots[j] = slot
        keys[j] = key
