"""fastpath.tenants: per-tenant buckets and concurrency in both twins, which agree."""

from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath import tenants
from fastpath.state import (
    ADMIT,
    BUCKET_REQUESTS,
    BUCKET_TOKENS,
    REFUSE_TENANT_CONCURRENCY,
    REFUSE_TENANT_RATE,
    REFUSE_TENANT_TOKENS,
)
from tests.conftest import loaded_twins, twin_params

NOW = 1000.0
REQ, TOK = BUCKET_REQUESTS, BUCKET_TOKENS

IMPLS = twin_params(tenants.tenants_py, tenants.tenants_c)
TWINS = loaded_twins(tenants.tenants_py, tenants.tenants_c)


@pytest.fixture(params=IMPLS, scope="module")
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def limiter(impl: ModuleType, *limits: dict[str, float]) -> Any:
    return impl.TenantLimiter([impl.TenantLimits(**limit) for limit in limits])


def test_unlimited_tenant_is_always_admitted(impl: ModuleType) -> None:
    t = limiter(impl, {})
    assert [t.admit(0, NOW) for _ in range(100)] == [ADMIT] * 100
    t.charge_tokens(0, 1e9, NOW)
    assert t.admit(0, NOW) == ADMIT
    assert t.inflight(0) == 101
    assert (t.limit(0, REQ), t.remaining(0, REQ, NOW), t.reset(0, REQ, NOW)) == (0.0, 0.0, 0.0)


def test_requests_per_second_bucket(impl: ModuleType) -> None:
    t = limiter(impl, {"requests_per_second": 4})
    assert [t.admit(0, NOW) for _ in range(5)] == [ADMIT] * 4 + [REFUSE_TENANT_RATE]
    assert t.retry_after == pytest.approx(0.25)  # one unit at 4/s
    assert t.remaining(0, REQ, NOW) == 0.0
    assert t.reset(0, REQ, NOW) == pytest.approx(1.0)
    assert t.admit(0, NOW + 0.25) == ADMIT
    assert t.admit(0, NOW + 0.25) == REFUSE_TENANT_RATE
    assert t.remaining(0, REQ, NOW + 10) == 4.0  # refills only up to its capacity
    assert t.limit(0, REQ) == 4.0


def test_slow_rate_allows_one_request_at_a_time(impl: ModuleType) -> None:
    t = limiter(impl, {"requests_per_second": 0.5})
    assert [t.admit(0, NOW), t.admit(0, NOW)] == [ADMIT, REFUSE_TENANT_RATE]
    assert t.retry_after == pytest.approx(2.0)
    assert t.admit(0, NOW + 2.0) == ADMIT


def test_concurrency_limit(impl: ModuleType) -> None:
    t = limiter(impl, {"max_concurrent": 2})
    assert [t.admit(0, NOW) for _ in range(3)] == [ADMIT, ADMIT, REFUSE_TENANT_CONCURRENCY]
    assert t.retry_after == 1.0
    t.release(0)
    assert t.admit(0, NOW) == ADMIT
    assert t.inflight(0) == 2


def test_tokens_are_charged_past_empty_and_refuse_the_next_request(impl: ModuleType) -> None:
    t = limiter(impl, {"tokens_per_minute": 60})  # refills 1 token/s
    assert t.admit(0, NOW) == ADMIT
    t.charge_tokens(0, 50, NOW)
    assert t.admit(0, NOW) == ADMIT  # 10 tokens left: not empty
    t.charge_tokens(0, 30, NOW)  # a stream in progress runs 20 into debt
    assert t.remaining(0, TOK, NOW) == 0.0
    assert t.admit(0, NOW) == REFUSE_TENANT_TOKENS
    assert t.retry_after == pytest.approx(21.0)  # back to one token
    assert t.reset(0, TOK, NOW) == pytest.approx(80.0)
    assert t.admit(0, NOW + 20.5) == REFUSE_TENANT_TOKENS
    assert t.admit(0, NOW + 21.0) == ADMIT
    assert t.limit(0, TOK) == 60.0


def test_tenants_are_independent(impl: ModuleType) -> None:
    t = limiter(
        impl, {"requests_per_second": 1, "tokens_per_minute": 10}, {"requests_per_second": 1}
    )
    assert t.admit(0, NOW) == ADMIT
    t.charge_tokens(0, 100, NOW)
    assert t.admit(0, NOW + 1) == REFUSE_TENANT_TOKENS
    assert t.admit(1, NOW) == ADMIT
    assert t.admit(1, NOW) == REFUSE_TENANT_RATE
    assert t.admit(1, NOW + 1) == ADMIT


def test_refusal_takes_nothing(impl: ModuleType) -> None:
    t = limiter(impl, {"requests_per_second": 2, "tokens_per_minute": 60, "max_concurrent": 5})
    t.charge_tokens(0, 60, NOW)
    assert t.admit(0, NOW) == REFUSE_TENANT_TOKENS
    assert (t.inflight(0), t.remaining(0, REQ, NOW)) == (0, 2.0)


def test_rejects_bad_arguments(impl: ModuleType) -> None:
    t = limiter(impl, {})
    with pytest.raises(IndexError, match=r"tenant: expected in \[0, 1\), got 1"):
        t.admit(1, NOW)
    with pytest.raises(IndexError, match="got -1"):
        t.charge_tokens(-1, 1, NOW)
    with pytest.raises(RuntimeError, match="without a matching admit"):
        t.release(0)
    with pytest.raises(ValueError, match="tokens"):
        t.charge_tokens(0, -1, NOW)
    with pytest.raises(ValueError, match="bucket"):
        t.remaining(0, 2, NOW)


@pytest.mark.parametrize(
    "limits",
    [
        {"requests_per_second": -1},
        {"tokens_per_minute": float("inf")},
        {"max_concurrent": 1.5},
        {"max_concurrent": "2"},
        {"requests_per_second": True},
    ],
)
def test_limits_reject_bad_values(impl: ModuleType, limits: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="expected"):
        impl.TenantLimits(**limits)


# ---------------------------------------------------------------------------- twins agree

operations = st.lists(
    st.tuples(
        st.sampled_from(["admit", "admit", "release", "charge", "headers"]),
        st.integers(0, 1),  # tenant
        st.sampled_from([0, 1, 7, 250]),  # tokens charged
        st.sampled_from([0.0, 0.001, 0.3, 2.0, 30.0]),  # time step
    ),
    max_size=60,
)
limit_values = st.fixed_dictionaries(
    {
        "requests_per_second": st.sampled_from([0, 0.5, 1, 3]),
        "max_concurrent": st.sampled_from([0, 1, 3]),
        "tokens_per_minute": st.sampled_from([0, 30, 600]),
    }
)


@settings(max_examples=300, deadline=None)
@given(ops=operations, limits=st.lists(limit_values, min_size=2, max_size=2))
def test_twins_agree(
    ops: list[tuple[str, int, int, float]], limits: list[dict[str, float]]
) -> None:
    if len(TWINS) < 2:
        pytest.skip("compiled tenants not loaded")
    twins = [limiter(m, *limits) for m in TWINS]
    now = NOW
    for op, tenant, tokens, step in ops:
        now += step
        results: list[tuple[Any, ...]] = []
        for t in twins:
            if op == "release":
                if t.inflight(tenant) == 0:
                    continue
                t.release(tenant)
                results.append((t.inflight(tenant),))
            elif op == "charge":
                t.charge_tokens(tenant, tokens, now)
                results.append((t.remaining(tenant, TOK, now),))
            elif op == "headers":
                results.append(
                    tuple(
                        f(tenant, bucket, now)
                        for bucket in (REQ, TOK)
                        for f in (t.remaining, t.reset)
                    )
                )
            else:
                results.append((t.admit(tenant, now), t.retry_after, t.inflight(tenant)))
        assert len(results) in (0, 2) and results[:1] == results[1:], (op, results)
