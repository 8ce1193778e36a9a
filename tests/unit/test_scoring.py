"""fastpath.scoring: behaviour of every policy in both twins, and the twins agree exactly."""

import math
from collections import Counter
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath import scoring
from fastpath import state as S
from tests.conftest import loaded_twins, twin_params

NOW = 1000.0
LQ, RR, P2C, HYBRID, AFFINITY = (
    S.POLICY_LEAST_QUEUE,
    S.POLICY_ROUND_ROBIN,
    S.POLICY_POWER_OF_TWO,
    S.POLICY_HYBRID,
    S.POLICY_PREFIX_AFFINITY,
)

IMPLS = twin_params(scoring.scoring_py, scoring.scoring_c)
TWINS = loaded_twins(scoring.scoring_py, scoring.scoring_c)


@pytest.fixture(params=IMPLS, scope="module")
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def fleet(n: int, **columns: Any) -> np.ndarray:
    """n ready, fresh, idle slots with unknown VRAM; ``columns`` overrides by name."""
    state = S.new_state(n)
    state[:, S.READY] = 1.0
    state[:, S.SIGNAL_AT] = NOW
    state[:, S.MAX_AGE] = 10.0
    for name, values in columns.items():
        state[:, getattr(S, name)] = values
    return state


def scorer_for(
    impl: ModuleType, state: np.ndarray, seed: int = 0, max_ranked: int = 16, **config: Any
) -> Any:
    return impl.Scorer(impl.ScoringConfig(**config), state, seed=seed, max_ranked=max_ranked)


def rank(scorer: Any, candidates: Any, policy: int, key: int = 0) -> list[int]:
    ranked = scorer.rank(np.asarray(candidates, dtype=np.int32), policy, NOW, key)
    result: list[int] = scorer.ranked[:ranked].tolist()
    return result


def hybrid_scores(state: np.ndarray, config: Any) -> np.ndarray:
    """The documented hybrid score, computed independently with numpy (no filters)."""
    limit = np.where(state[:, S.QUEUE_LIMIT] > 0, state[:, S.QUEUE_LIMIT], config.queue_saturation)
    total = state[:, S.VRAM_TOTAL]
    vram = np.divide(state[:, S.VRAM_USED], total, out=np.zeros(len(state)), where=total > 0)
    score = (
        config.queue_weight * np.maximum(state[:, S.QUEUE_DEPTH], state[:, S.INFLIGHT]) / limit
        + config.vram_weight * vram
        + config.kv_weight * np.nan_to_num(state[:, S.KV_FRACTION], nan=0.0)
        + config.ttft_weight * np.nan_to_num(state[:, S.TTFT_EWMA], nan=0.0) / config.ttft_scale
    )
    result: np.ndarray = score / state[:, S.WEIGHT]
    return result


# ---------------------------------------------------------------------------- policies


def test_least_queue_picks_lowest_queue(impl: ModuleType) -> None:
    state = fleet(4, QUEUE_DEPTH=[5, 2, 9, 3], INFLIGHT=[0, 1, 0, 1])
    scorer = scorer_for(impl, state)
    assert rank(scorer, [0, 1, 2, 3], LQ) == [1, 3, 0, 2]


def test_least_queue_divides_by_weight(impl: ModuleType) -> None:
    # Slot 0 re-enters after an ejection at weight 0.25: 2 / 0.25 = 8 > 5.
    state = fleet(2, QUEUE_DEPTH=[2, 5], WEIGHT=[0.25, 1.0])
    scorer = scorer_for(impl, state)
    assert rank(scorer, [0, 1], LQ) == [1, 0]


def test_hybrid_avoids_deep_queue_and_vram_pressure(impl: ModuleType) -> None:
    gb = 1e9
    state = fleet(
        3,
        QUEUE_DEPTH=[20, 1, 1],
        VRAM_TOTAL=80 * gb,
        VRAM_USED=[10 * gb, 70 * gb, 20 * gb],
    )
    scorer = scorer_for(impl, state)
    assert rank(scorer, [0, 1, 2], HYBRID) == [2, 1, 0]


def test_hybrid_filters_vram_saturated(impl: ModuleType) -> None:
    gb = 1e9
    # Slot 0 is idle but above the 0.95 VRAM threshold; slot 1 is busy but has room.
    state = fleet(2, QUEUE_DEPTH=[0, 10], VRAM_TOTAL=80 * gb, VRAM_USED=[77 * gb, 40 * gb])
    scorer = scorer_for(impl, state)
    assert rank(scorer, [0, 1], HYBRID) == [1]
    assert scorer.saturated == 1


def test_hybrid_uses_kv_and_ttft_when_present(impl: ModuleType) -> None:
    state = fleet(3, KV_FRACTION=[0.9, math.nan, 0.1], TTFT_EWMA=[0.1, 2.0, math.nan])
    scorer = scorer_for(impl, state)
    # scores: 0.45 + 0.05 = 0.5, 0 + 1.0 = 1.0, 0.05 + 0 = 0.05
    assert rank(scorer, [0, 1, 2], HYBRID) == [2, 0, 1]


def test_hybrid_full_ranking_matches_documented_score(impl: ModuleType) -> None:
    rng = np.random.default_rng(3)
    n = 40
    state = fleet(
        n,
        QUEUE_DEPTH=rng.integers(0, 20, n),
        INFLIGHT=rng.integers(0, 5, n),
        QUEUE_LIMIT=rng.choice([0.0, 24.0, 64.0], n),
        VRAM_TOTAL=rng.choice([0.0, 80.0], n),
        VRAM_USED=rng.uniform(0, 75, n),
        KV_FRACTION=np.where(rng.random(n) < 0.3, math.nan, rng.random(n)),
        TTFT_EWMA=np.where(rng.random(n) < 0.3, math.nan, rng.uniform(0, 1, n)),
        WEIGHT=rng.choice([1.0, 0.5], n),
    )
    config = impl.ScoringConfig(queue_weight=1.0, vram_weight=0.7, kv_weight=0.3, ttft_weight=0.2)
    expected = np.argsort(hybrid_scores(state, config), kind="stable").tolist()
    for k in (1, 3, 7, n):  # a shorter ranking is the same best-first prefix
        scorer = impl.Scorer(config, state, max_ranked=k)
        assert rank(scorer, range(n), HYBRID) == expected[:k]


def test_round_robin_rotates_over_eligible(impl: ModuleType) -> None:
    state = fleet(4, READY=[1, 0, 1, 1])
    scorer = scorer_for(impl, state)
    firsts = [rank(scorer, [0, 1, 2, 3], RR)[0] for _ in range(6)]
    assert firsts == [0, 2, 3, 0, 2, 3]
    assert rank(scorer, [0, 1, 2, 3], RR) == [0, 2, 3]


def test_round_robin_rotates_each_model_on_its_own(impl: ModuleType) -> None:
    # Model a on slots 0-1, model b on slots 2-3, requests alternating: with one turn
    # counter shared by both models, each model would always get its first slot.
    scorer = scorer_for(impl, fleet(4))
    picks = [(rank(scorer, [0, 1], RR)[0], rank(scorer, [2, 3], RR)[0]) for _ in range(6)]
    assert picks == [(0, 2), (1, 3)] * 3


def test_round_robin_gives_a_returning_slot_its_turn(impl: ModuleType) -> None:
    state = fleet(3)
    scorer = scorer_for(impl, state)
    assert [rank(scorer, [0, 1, 2], RR)[0] for _ in range(3)] == [0, 1, 2]
    state[1, S.READY] = 0.0
    assert [rank(scorer, [0, 1, 2], RR)[0] for _ in range(4)] == [0, 2, 0, 2]
    state[1, S.READY] = 1.0  # back: chosen least recently, so it goes first
    assert [rank(scorer, [0, 1, 2], RR)[0] for _ in range(3)] == [1, 0, 2]


def test_power_of_two_better_of_two_wins(impl: ModuleType) -> None:
    state = fleet(2, QUEUE_DEPTH=[8, 1])
    scorer = scorer_for(impl, state, seed=5)
    assert all(rank(scorer, [0, 1], P2C) == [1, 0] for _ in range(20))


def test_power_of_two_samples_and_never_picks_the_worst(impl: ModuleType) -> None:
    n = 8
    state = fleet(n, QUEUE_DEPTH=np.arange(n))  # slot i has queue i: slot 7 is the worst
    scorer = scorer_for(impl, state, seed=11, max_ranked=1)
    picks = Counter(rank(scorer, range(n), P2C)[0] for _ in range(400))
    assert n - 1 not in picks
    assert len(picks) >= 5  # random pairs, not always the global best


def test_prefix_affinity_sticks_and_spreads(impl: ModuleType) -> None:
    n = 8
    state = fleet(n, QUEUE_DEPTH=np.arange(n))
    scorer = scorer_for(impl, state)
    homes = {}
    for key in range(200):
        homes[key] = rank(scorer, range(n), AFFINITY, key=key)[0]
    state[:, S.QUEUE_DEPTH] = np.arange(n)[::-1]  # load changes below saturation
    assert all(rank(scorer, range(n), AFFINITY, key=key)[0] == home for key, home in homes.items())
    assert len(set(homes.values())) == n  # keys spread over the whole fleet


def test_prefix_affinity_falls_back_to_hybrid_when_home_saturated(impl: ModuleType) -> None:
    n = 6
    state = fleet(n, QUEUE_DEPTH=[4, 1, 3, 2, 5, 6])
    scorer = scorer_for(impl, state)
    key = 42
    home = rank(scorer, range(n), AFFINITY, key=key)[0]
    state[home, S.QUEUE_DEPTH] = 1000.0  # over the queue limit: saturated
    hybrid = [s for s in np.argsort(state[:, S.QUEUE_DEPTH], kind="stable").tolist() if s != home]
    assert rank(scorer, range(n), AFFINITY, key=key) == hybrid
    state[home, S.QUEUE_DEPTH] = 0.0
    assert rank(scorer, range(n), AFFINITY, key=key)[0] == home


def test_prefix_affinity_home_is_consistent_when_a_backend_leaves(impl: ModuleType) -> None:
    n = 8
    state = fleet(n)
    scorer = scorer_for(impl, state)
    before = {key: rank(scorer, range(n), AFFINITY, key=key)[0] for key in range(300)}
    state[3, S.READY] = 0.0
    after = {key: rank(scorer, range(n), AFFINITY, key=key)[0] for key in range(300)}
    moved = {key for key in before if before[key] != after[key]}
    assert moved == {key for key, home in before.items() if home == 3}  # rendezvous hashing


def test_stale_counts_as_saturated_not_idle(impl: ModuleType) -> None:
    # Slots 0 and 1 look idle but their signals are old or missing; slot 2 is busy.
    state = fleet(3, QUEUE_DEPTH=[0, 0, 10], SIGNAL_AT=[NOW - 60, math.nan, NOW])
    scorer = scorer_for(impl, state)
    for policy in (RR, LQ, P2C, HYBRID, AFFINITY):
        assert rank(scorer, [0, 1, 2], policy) == [2]
        assert scorer.saturated == 2
    state[2, S.SIGNAL_AT] = NOW - 11  # MAX_AGE is 10
    assert rank(scorer, [0, 1, 2], HYBRID) == []
    assert scorer.saturated == 3


def test_queue_limit_saturates(impl: ModuleType) -> None:
    state = fleet(3, QUEUE_DEPTH=[4, 30, 5], INFLIGHT=[1, 32, 0], QUEUE_LIMIT=[4, 0, 0])
    scorer = scorer_for(impl, state, queue_saturation=32)
    # slot 0's Triton queue reaches its own limit (4), slot 1's in-flight the default (32)
    assert rank(scorer, [0, 1, 2], LQ) == [2]
    assert scorer.saturated == 2


def test_queued_requests_of_the_gateway_are_not_counted_twice(impl: ModuleType) -> None:
    # 31 requests in flight, 30 of them waiting in Triton's queue: a load of 31, not 61.
    state = fleet(2, QUEUE_DEPTH=[30, 0], INFLIGHT=[31, 0])
    scorer = scorer_for(impl, state, queue_saturation=32)
    assert rank(scorer, [0, 1], LQ) == [1, 0]
    assert scorer.saturated == 0


def test_unavailable_slots_are_neither_eligible_nor_saturated(impl: ModuleType) -> None:
    state = fleet(5, READY=[0, 1, 1, 1, 1], CIRCUIT_OPEN=[0, 1, 0, 0, 0], DRAINING=[0, 0, 1, 0, 0])
    state[3, S.WEIGHT] = 0.0
    scorer = scorer_for(impl, state)
    for policy in (RR, LQ, P2C, HYBRID, AFFINITY):
        assert rank(scorer, range(5), policy) == [4]
        assert scorer.saturated == 0
    assert rank(scorer, [0, 1, 2, 3], HYBRID) == []
    assert rank(scorer, [], HYBRID) == []


def test_ties_are_broken_by_the_seed(impl: ModuleType) -> None:
    state = fleet(6)  # all idle: every score ties

    def firsts(seed: int) -> list[int]:
        scorer = scorer_for(impl, state, seed=seed)
        return [rank(scorer, range(6), HYBRID)[0] for _ in range(60)]

    assert firsts(1) == firsts(1)
    assert firsts(1) != firsts(2)
    assert len(set(firsts(1))) == 6  # idle backends share the load, slot 0 is not favoured
    # Among equal scores the order is the candidate order, rotated to a random start.
    candidates = [4, 0, 5, 2, 3, 1]
    for k in (2, 6):
        ranked = rank(scorer_for(impl, state, seed=3, max_ranked=k), candidates, HYBRID)
        start = candidates.index(ranked[0])
        assert ranked == (candidates[start:] + candidates[:start])[:k]


def test_nogil_sized_fleet(impl: ModuleType) -> None:
    n = scoring.scoring_py.NOGIL_MIN_CANDIDATES + 7
    rng = np.random.default_rng(9)
    state = fleet(n, QUEUE_DEPTH=rng.permutation(n), QUEUE_LIMIT=1e9)
    scorer = scorer_for(impl, state, max_ranked=5)
    assert rank(scorer, range(n), LQ) == np.argsort(state[:, S.QUEUE_DEPTH])[:5].tolist()


# ---------------------------------------------------------------------------- errors, hash


def test_rank_rejects_bad_arguments(impl: ModuleType) -> None:
    state = fleet(3)
    scorer = scorer_for(impl, state)
    with pytest.raises(IndexError, match=r"candidates\[1\]: expected a slot in \[0, 3\), got 3"):
        rank(scorer, [0, 3], HYBRID)
    with pytest.raises(IndexError, match="got -1"):
        rank(scorer, [-1], HYBRID)
    with pytest.raises(ValueError, match="policy"):
        rank(scorer, [0], 99)
    with pytest.raises(ValueError, match="state: expected shape"):
        scorer_for(impl, np.zeros((3, S.NFIELDS - 1)))
    with pytest.raises(ValueError, match="max_ranked: expected >= 1"):
        scorer_for(impl, state, max_ranked=0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("queue_weight", -1.0),
        ("ttft_scale", 0.0),
        ("vram_saturation", 1.5),
        ("queue_saturation", 0.0),
        ("kv_weight", math.nan),
    ],
)
def test_config_rejects_bad_values(impl: ModuleType, field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        impl.ScoringConfig(**{field: value})


def test_affinity_hash_is_fnv1a_of_the_prefix(impl: ModuleType) -> None:
    assert impl.affinity_hash(b"", 16) == 0xCBF29CE484222325  # the FNV-1a 64 offset basis
    assert impl.affinity_hash(b"a", 16) == 0xAF63DC4C8601EC8C  # published FNV-1a 64 vector
    assert impl.affinity_hash(b"foobar", 16) == 0x85944171F73967E8
    assert impl.affinity_hash(b"foobar", 3) == impl.affinity_hash(b"foo-other", 3)
    assert impl.affinity_hash(bytearray(b"foobar"), 16) == impl.affinity_hash(b"foobar", 99)
    assert impl.affinity_hash(memoryview(b"xfoobar")[1:], 16) == impl.affinity_hash(b"foobar", 6)


# ---------------------------------------------------------------------------- twins agree

# Mostly healthy rows, so rankings are long and ties (equal scores) are frequent.
flag = st.sampled_from([1.0] * 8 + [0.0, math.nan])
off_flag = st.sampled_from([0.0] * 8 + [1.0, math.nan])
maybe_nan = st.sampled_from([0.0, 0.5, math.nan]) | st.floats(0.0, 2.0)
rows = st.tuples(
    st.sampled_from([0.0, 1.0, 3.0, 31.0, 40.0, math.inf]) | st.floats(0, 100),  # QUEUE_DEPTH
    st.integers(0, 8).map(float),  # INFLIGHT
    st.sampled_from([0.0, 50.0, math.nan]) | st.floats(0, 100),  # VRAM_USED
    st.sampled_from([0.0, 80.0, 100.0]),  # VRAM_TOTAL
    maybe_nan,  # KV_FRACTION
    maybe_nan,  # TTFT_EWMA
    maybe_nan,  # TPOT_EWMA
    flag,  # READY
    off_flag,  # CIRCUIT_OPEN
    off_flag,  # DRAINING
    st.sampled_from([NOW, NOW - 1, math.nan]) | st.floats(NOW - 30, NOW + 1),  # SIGNAL_AT
    st.sampled_from([10.0] * 4 + [5.0, math.nan]),  # MAX_AGE
    st.sampled_from([1.0] * 6 + [0.5, 0.0, -1.0]),  # WEIGHT
    st.sampled_from([0.0, 4.0, 32.0, -1.0]),  # QUEUE_LIMIT
)
calls = st.lists(
    st.tuples(
        st.sampled_from(sorted(S.POLICY_NAMES.values())),
        st.integers(0, 2**64 - 1),  # affinity key
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    fleet_rows=st.lists(rows, min_size=1, max_size=12),
    data=st.data(),
    seed=st.integers(-(2**63), 2**64),
    max_ranked=st.integers(1, 10),
    call_list=calls,
)
def test_twins_agree(
    fleet_rows: list[tuple[float, ...]],
    data: st.DataObject,
    seed: int,
    max_ranked: int,
    call_list: list[tuple[int, int]],
) -> None:
    if len(TWINS) < 2:
        pytest.skip("compiled scoring not loaded")
    state = np.array(fleet_rows, dtype=np.float64)
    candidates = np.array(
        data.draw(st.lists(st.integers(0, len(fleet_rows) - 1), max_size=12)), dtype=np.int32
    )
    config = scoring.scoring_py.ScoringConfig(kv_weight=data.draw(st.sampled_from([0.0, 0.5])))
    scorers = [m.Scorer(config, state, seed=seed, max_ranked=max_ranked) for m in TWINS]
    for policy, key in call_list:
        results = []
        for scorer in scorers:
            # The plain twin computes on numpy scalars, which warn on inf - inf; C does not.
            with np.errstate(all="ignore"):
                ranked = scorer.rank(candidates, policy, NOW, key)
            results.append((ranked, scorer.ranked[:ranked].tolist(), scorer.saturated))
        assert results[0] == results[1], (policy, key)
    with np.errstate(all="ignore"):
        scores = [[scorer.score(slot) for slot in range(len(fleet_rows))] for scorer in scorers]
    # NaN != NaN: compare the scores as their reprs so that NaN matches NaN.
    assert [repr(x) for x in scores[0]] == [repr(x) for x in scores[1]]


def test_score_orders_like_hybrid(impl: ModuleType) -> None:
    state = fleet(3)
    state[0, S.QUEUE_DEPTH] = 10.0
    state[2, S.TTFT_EWMA] = 0.5
    scorer = impl.Scorer(impl.ScoringConfig(), state)
    scores = [scorer.score(slot) for slot in range(3)]
    assert scores[1] < scores[2] < scores[0]
    ranked = scorer.rank(np.arange(3, dtype=np.int32), S.POLICY_HYBRID, NOW, 0)
    assert scorer.ranked[:ranked].tolist() == [1, 2, 0]
    with pytest.raises(IndexError):
        scorer.score(3)
