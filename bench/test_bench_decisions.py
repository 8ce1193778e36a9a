"""Per-request decisions, both twins: one hybrid ranking, one admit + release.

Run with ``pytest bench/test_bench_decisions.py --benchmark-only``. Targets (not tests):
ranking 64 backends in <= 1 µs and >= 20x faster than the pure-Python twin; admission
<= 200 ns. The machine is shared and noisy: compare ratios within one run.
"""

from typing import Any

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from fastpath import admission, scoring
from fastpath import state as S
from tests.conftest import twin_params

NOW = 1000.0
RANKED = 3  # the choice and two retry fallbacks (Scorer's default max_ranked)
# Sub-microsecond calls: rounds of >= 200 µs amortize the timer's own ~100 ns per round,
# and a warmup keeps the first (cold) call from calibrating a single iteration per round.
MIN_TIME = 0.0002


def _fleet(n: int) -> np.ndarray:
    """n healthy slots with distinct, realistic loads (every signal present)."""
    rng = np.random.default_rng(n)
    state = S.new_state(n)
    state[:, S.READY] = 1.0
    state[:, S.SIGNAL_AT] = NOW - rng.uniform(0, 1, n)
    state[:, S.MAX_AGE] = 5.0
    state[:, S.QUEUE_DEPTH] = rng.integers(0, 16, n)
    state[:, S.INFLIGHT] = rng.integers(0, 8, n)
    state[:, S.VRAM_TOTAL] = 80e9
    state[:, S.VRAM_USED] = rng.uniform(20e9, 70e9, n)
    state[:, S.KV_FRACTION] = rng.uniform(0, 0.9, n)
    state[:, S.TTFT_EWMA] = rng.uniform(0.05, 0.5, n)
    return state


@pytest.mark.benchmark(min_time=MIN_TIME, warmup=True)
@pytest.mark.parametrize("impl", twin_params(scoring.scoring_py, scoring.scoring_c))
@pytest.mark.parametrize("n", [8, 64])
def test_rank_hybrid(benchmark: BenchmarkFixture, impl: Any, n: int) -> None:
    benchmark.group = f"rank hybrid, {n} candidates"
    state = _fleet(n)
    candidates = np.arange(n, dtype=np.int32)
    reference = scoring.scoring_py.Scorer(scoring.scoring_py.ScoringConfig(), state)
    reference.rank(candidates, S.POLICY_HYBRID, NOW, 0)
    scorer = impl.Scorer(impl.ScoringConfig(), state, max_ranked=RANKED)
    ranked = benchmark(scorer.rank, candidates, S.POLICY_HYBRID, NOW, 0)
    assert ranked == RANKED
    assert scorer.ranked.tolist() == reference.ranked.tolist()


@pytest.mark.benchmark(group="admit + release", min_time=MIN_TIME, warmup=True)
@pytest.mark.parametrize("impl", twin_params(admission.admission_py, admission.admission_c))
def test_admit_release(benchmark: BenchmarkFixture, impl: Any) -> None:
    admitter = impl.Admitter(impl.AdmissionConfig(), 4)
    admit = admitter.admit
    release = admitter.release

    def admit_release() -> int:
        result: int = admit(2, S.PRIORITY_STANDARD, RANKED, 0, NOW)
        release(2, NOW)
        return result

    assert benchmark(admit_release) == S.ADMIT
    assert admitter.inflight() == 0
