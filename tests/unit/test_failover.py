"""forward.with_failover: retries on the next backend share the request's one deadline."""

from __future__ import annotations

from typing import cast

import pytest

from gateway.errors import GatewayTimeout
from gateway.fleet import Backend
from gateway.forward import with_failover
from gateway.http_upstream import UpstreamConnectFailed
from gateway.router import Lease


class ScriptedLease:
    """Two ranked backends, a clock the test moves, and what failover reports."""

    def __init__(self) -> None:
        self.slots = [0, 1]
        self.clock = 0.0  # seconds since admission
        self.reports: list[str] = []

    def elapsed(self) -> float:
        return self.clock

    def attempt(self, slot: int) -> Backend:
        return cast(Backend, f"backend-{slot}")

    def may_retry(self) -> bool:
        return True

    def backend_unreachable(self) -> None:
        self.reports.append("unreachable")

    def backend_ok(self) -> None:
        self.reports.append("ok")


async def run_failover(
    lease: ScriptedLease, first_attempt_takes: float, timeout: float
) -> list[float]:
    """The time left that each attempt was given; the first fails as unreachable after
    ``first_attempt_takes`` seconds, the second answers."""
    given: list[float] = []

    async def call(backend: Backend, left: float) -> str:
        given.append(left)
        if len(given) == 1:
            lease.clock += first_attempt_takes
            raise UpstreamConnectFailed("connection refused")
        return "answer"

    assert await with_failover(cast(Lease, lease), call, timeout) == "answer"
    return given


async def test_a_retry_gets_what_the_first_attempt_left_of_the_deadline() -> None:
    lease = ScriptedLease()
    lease.clock = 0.25  # admitted, then routed and read
    assert await run_failover(lease, first_attempt_takes=5.0, timeout=30.0) == [29.75, 24.75]
    assert lease.reports == ["unreachable", "ok"]


async def test_no_retry_once_the_first_attempt_used_the_whole_deadline() -> None:
    lease = ScriptedLease()
    with pytest.raises(GatewayTimeout, match="deadline of 2 s exceeded"):
        await run_failover(lease, first_attempt_takes=2.0, timeout=2.0)
    assert lease.reports == ["unreachable"]
