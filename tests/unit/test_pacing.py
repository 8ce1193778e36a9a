"""gateway.pacing.StartPacer: a burst of starts spread over loop iterations, a lone
start never delayed, on uvloop (the gateway's loop) and asyncio's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from gateway.pacing import StartPacer

PER_ITERATION = 8
Scenario = Callable[[], Coroutine[Any, Any, None]]


@pytest.fixture(params=[asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Scenario], None]:
    """Runs a scenario on a new loop of each kind."""

    def run_scenario(scenario: Scenario) -> None:
        with asyncio.Runner(loop_factory=request.param) as runner:
            runner.run(scenario())

    return run_scenario


class Starts:
    """A pacer on the running loop, the loop's iterations counted (a callback that
    schedules itself again runs once in each), and each start logged with its iteration."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.pacer = StartPacer(self.loop, PER_ITERATION)
        self.iteration = 0
        self.log: list[tuple[int, int]] = []  # (start, iteration it ran in)
        self._tick = self.loop.call_soon(self._next_iteration)

    def _next_iteration(self) -> None:
        self.iteration += 1
        self._tick = self.loop.call_soon(self._next_iteration)

    async def start(self, n: int) -> None:
        """What a front connection does before serving: start now or wait for a turn."""
        if not self.pacer.may_start():
            await self.pacer.wait()
        self.log.append((n, self.iteration))

    def stop_counting(self) -> None:
        self._tick.cancel()


def test_a_burst_runs_at_most_per_iteration_starts_in_each_iteration_in_order(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario() -> None:
        starts = Starts()
        burst = 3 * PER_ITERATION + 5
        await asyncio.gather(*(starts.start(n) for n in range(burst)))
        starts.stop_counting()
        assert [n for n, _ in starts.log] == list(range(burst))  # arrival order kept
        per_iteration: dict[int, int] = {}
        for _, iteration in starts.log:
            per_iteration[iteration] = per_iteration.get(iteration, 0) + 1
        assert max(per_iteration.values()) == PER_ITERATION
        assert len(per_iteration) == 4  # 8 + 8 + 8 + 5
        assert starts.pacer.waiting == 0

    run(scenario)


def test_a_lone_start_and_the_first_of_each_iteration_never_wait(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario() -> None:
        pacer = StartPacer(asyncio.get_running_loop(), PER_ITERATION)
        for _ in range(3 * PER_ITERATION):
            assert pacer.may_start()
            await asyncio.sleep(0)  # the next iteration: its count starts again
        for _ in range(PER_ITERATION):
            assert pacer.may_start()
        assert not pacer.may_start()  # one iteration's share is spent

    run(scenario)


def test_a_cancelled_waiter_gives_its_turn_to_the_next(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        starts = Starts()
        burst = 2 * PER_ITERATION
        tasks = [starts.loop.create_task(starts.start(n)) for n in range(burst)]
        await asyncio.sleep(0)  # all have run once: the first 8 started, 8 wait
        assert starts.pacer.waiting == PER_ITERATION
        for task in tasks[PER_ITERATION : PER_ITERATION + 3]:  # three clients hang up
            task.cancel()
        late = starts.loop.create_task(starts.start(burst))
        await asyncio.gather(*tasks, late, return_exceptions=True)
        starts.stop_counting()
        when = dict(starts.log)
        assert sorted(when) == [*range(PER_ITERATION), *range(PER_ITERATION + 3, burst), burst]
        # The three cancelled turns were not counted: the five still waiting start in one
        # iteration, and the late start takes a sixth place without waiting behind them.
        assert len({when[n] for n in range(PER_ITERATION + 3, burst)}) == 1
        assert when[burst] <= when[burst - 1]
        assert starts.pacer.waiting == 0

    run(scenario)


def test_per_iteration_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        StartPacer(asyncio.new_event_loop(), 0)
