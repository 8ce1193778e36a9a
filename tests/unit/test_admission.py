"""fastpath.admission: limits, priorities, reasons and Retry-After in both twins, which agree."""

import math
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath import admission
from fastpath.state import (
    ADMIT,
    PRIORITY_CRITICAL,
    PRIORITY_SHEDDABLE,
    PRIORITY_STANDARD,
    REASON_NAMES,
    REFUSE_NO_BACKEND,
    REFUSE_OVER_LIMIT,
    REFUSE_SATURATED,
)
from tests.conftest import loaded_twins, twin_params

CRIT, STD, SHED = PRIORITY_CRITICAL, PRIORITY_STANDARD, PRIORITY_SHEDDABLE
NOW = 1000.0

IMPLS = twin_params(admission.admission_py, admission.admission_c)
TWINS = loaded_twins(admission.admission_py, admission.admission_c)


@pytest.fixture(params=IMPLS, scope="module")
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def admitter(impl: ModuleType, models: int = 2, **config: Any) -> Any:
    return impl.Admitter(impl.AdmissionConfig(**config), models)


def admit(a: Any, model: int = 0, priority: int = STD, eligible: int = 1) -> int:
    result: int = a.admit(model, priority, eligible, 0, NOW)
    return result


def test_reason_names() -> None:
    assert REASON_NAMES == {
        REFUSE_SATURATED: "saturated",
        REFUSE_OVER_LIMIT: "over_limit",
        REFUSE_NO_BACKEND: "no_backend",
    }


# ---------------------------------------------------------------------------- limits


def test_counts_admitted_until_released(impl: ModuleType) -> None:
    a = admitter(impl)
    assert [admit(a, 0), admit(a, 1), admit(a, 1)] == [ADMIT] * 3
    assert (a.inflight(), a.inflight(0), a.inflight(1)) == (3, 1, 2)
    a.release(1, NOW)
    assert (a.inflight(), a.inflight(0), a.inflight(1)) == (2, 1, 1)


def test_priority_classes_on_the_model_limit(impl: ModuleType) -> None:
    # soft 4, hard 6, sheddable at int(4 * 0.5) = 2
    a = admitter(impl, model_max_inflight=4, model_max_inflight_hard=6, sheddable_fraction=0.5)
    assert [admit(a, priority=SHED) for _ in range(3)] == [ADMIT, ADMIT, REFUSE_OVER_LIMIT]
    assert [admit(a, priority=STD) for _ in range(3)] == [ADMIT, ADMIT, REFUSE_OVER_LIMIT]
    assert [admit(a, priority=CRIT) for _ in range(3)] == [ADMIT, ADMIT, REFUSE_OVER_LIMIT]
    assert a.inflight(0) == 6
    assert admit(a, model=1, priority=SHED) == ADMIT  # another model has its own limit


def test_priority_classes_on_the_global_limit(impl: ModuleType) -> None:
    a = admitter(impl, models=3, max_inflight=3, max_inflight_hard=4, sheddable_fraction=0.34)
    assert [admit(a, model=m, priority=STD) for m in range(3)] == [ADMIT] * 3
    assert admit(a, model=0, priority=SHED) == REFUSE_OVER_LIMIT
    assert admit(a, model=1, priority=STD) == REFUSE_OVER_LIMIT
    assert admit(a, model=2, priority=CRIT) == ADMIT  # critical may exceed the soft limit
    assert admit(a, model=2, priority=CRIT) == REFUSE_OVER_LIMIT  # but not the hard one
    a.release(0, NOW)
    assert admit(a, model=0, priority=CRIT) == ADMIT


def test_set_model_limits(impl: ModuleType) -> None:
    a = admitter(impl)
    a.set_model_limits(1, 1, 2)
    assert [admit(a, model=1) for _ in range(2)] == [ADMIT, REFUSE_OVER_LIMIT]
    assert admit(a, model=1, priority=CRIT) == ADMIT
    assert admit(a, model=0) == ADMIT  # untouched model keeps the default
    with pytest.raises(ValueError, match="soft <= hard"):
        a.set_model_limits(0, 3, 2)


def test_saturated_versus_no_backend(impl: ModuleType) -> None:
    a = admitter(impl)
    assert a.admit(0, STD, 0, 2, NOW) == REFUSE_SATURATED
    assert a.admit(0, CRIT, 0, 2, NOW) == REFUSE_SATURATED  # saturation is not a soft limit
    assert a.admit(0, STD, 0, 0, NOW) == REFUSE_NO_BACKEND
    assert a.inflight() == 0


# ---------------------------------------------------------------------------- Retry-After


def steady_drain(a: Any, model: int, interval: float, count: int, start: float) -> float:
    """Keep the model's in-flight count constant while completing one per ``interval``."""
    now = start
    for _ in range(count):
        now += interval
        a.release(model, now)
        assert a.admit(model, CRIT, 1, 0, now) == ADMIT
    return now


def test_retry_after_follows_the_drain_rate(impl: ModuleType) -> None:
    tau, interval, inflight = 5.0, 0.5, 10
    a = admitter(impl, drain_time_constant=tau, model_max_inflight=inflight)
    for _ in range(inflight):
        assert admit(a) == ADMIT
    now = steady_drain(a, 0, interval, 200, NOW)  # 20 tau: converged within e^-20
    # Right after a completion, periodic completions give rate (1/tau) / (1 - e^(-d/tau)).
    rate = (1 / tau) / (1 - math.exp(-interval / tau))
    assert a.admit(0, STD, 0, 3, now) == REFUSE_SATURATED
    assert a.retry_after == pytest.approx((inflight + 1) / rate, rel=1e-6)
    assert a.admit(0, STD, 1, 0, now) == REFUSE_OVER_LIMIT  # 10 in flight, soft limit 10
    assert a.retry_after == pytest.approx(max(1.0, 1 / rate), rel=1e-6)
    # With no completions for tau * ln 2 the rate halves, so the wait doubles.
    assert a.admit(0, STD, 0, 3, now + tau * math.log(2)) == REFUSE_SATURATED
    assert a.retry_after == pytest.approx(2 * (inflight + 1) / rate, rel=1e-6)


def test_retry_after_is_clamped(impl: ModuleType) -> None:
    a = admitter(impl, retry_after_min=2.0, retry_after_max=30.0, model_max_inflight=1)
    assert admit(a) == ADMIT
    assert admit(a) == REFUSE_OVER_LIMIT
    assert a.retry_after == 30.0  # nothing drained yet: the maximum
    steady_drain(a, 0, 0.001, 50, NOW)  # a fast drain: 1 / rate is far below the minimum
    assert a.admit(0, STD, 1, 0, NOW + 0.05) == REFUSE_OVER_LIMIT
    assert a.retry_after == 2.0
    assert a.admit(0, STD, 0, 0, NOW) == REFUSE_NO_BACKEND
    assert a.retry_after == 2.0


# ---------------------------------------------------------------------------- errors


def test_rejects_bad_arguments(impl: ModuleType) -> None:
    a = admitter(impl, models=2)
    with pytest.raises(IndexError, match=r"model_index: expected in \[0, 2\), got 2"):
        a.admit(2, STD, 1, 0, NOW)
    with pytest.raises(IndexError, match="got -1"):
        a.release(-1, NOW)
    with pytest.raises(ValueError, match="priority"):
        a.admit(0, 3, 1, 0, NOW)
    with pytest.raises(RuntimeError, match="without a matching admit"):
        a.release(0, NOW)
    with pytest.raises(ValueError, match="model_capacity"):
        impl.Admitter(impl.AdmissionConfig(), -1)


@pytest.mark.parametrize(
    "config",
    [
        {"max_inflight": 0},
        {"max_inflight": 10, "max_inflight_hard": 5},
        {"model_max_inflight_hard": 1},
        {"sheddable_fraction": 1.5},
        {"drain_time_constant": 0.0},
        {"retry_after_min": 0.0},
        {"retry_after_min": 10.0, "retry_after_max": 5.0},
    ],
)
def test_config_rejects_bad_values(impl: ModuleType, config: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="expected"):
        impl.AdmissionConfig(**config)


# ---------------------------------------------------------------------------- twins agree

operations = st.lists(
    st.tuples(
        st.sampled_from(["admit", "admit", "release"]),
        st.integers(0, 2),  # model
        st.sampled_from([CRIT, STD, SHED]),
        st.sampled_from([0, 1, 1, 1, 3]),  # eligible
        st.sampled_from([0, 0, 2]),  # saturated
        st.sampled_from([0.0, 0.001, 0.3, 2.0, 30.0]),  # time step
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=operations,
    soft=st.integers(1, 6),
    extra=st.integers(0, 3),
    model_soft=st.integers(1, 4),
    fraction=st.sampled_from([0.0, 0.5, 0.75, 1.0]),
    tau=st.sampled_from([0.5, 5.0]),
)
def test_twins_agree(
    ops: list[tuple[str, int, int, int, int, float]],
    soft: int,
    extra: int,
    model_soft: int,
    fraction: float,
    tau: float,
) -> None:
    if len(TWINS) < 2:
        pytest.skip("compiled admission not loaded")
    config = admission.admission_py.AdmissionConfig(
        max_inflight=soft,
        max_inflight_hard=soft + extra,
        model_max_inflight=model_soft,
        model_max_inflight_hard=model_soft + extra,
        sheddable_fraction=fraction,
        drain_time_constant=tau,
    )
    twins = [m.Admitter(config, 3) for m in TWINS]
    now = NOW
    for op, model, priority, eligible, saturated, step in ops:
        now += step
        results: list[tuple[Any, ...]] = []
        for a in twins:
            if op == "release":
                if a.inflight(model) == 0:
                    continue
                a.release(model, now)
                results.append((a.inflight(), a.inflight(model)))
            else:
                code = a.admit(model, priority, eligible, saturated, now)
                results.append((code, a.retry_after, a.inflight(), a.inflight(model)))
        assert len(results) in (0, 2) and results[:1] == results[1:], (op, results)
