"""gateway.pacing.StartPacer: a burst of starts spread over loop iterations, a lone
start never delayed, on uvloop (the gateway's loop) and asyncio's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from gateway.pacing import StartPacer

LOOPS = [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(uvloop.new_event_loop, id="uvloop"),
]
PER_ITERATION = 8


class IterationCounter:
    """Counts loop iterations: a callback that schedules itself again runs once in each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = 0
        self._loop = loop
        self._handle = loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.now += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def start(
    pacer: StartPacer, iterations: IterationCounter, log: list[tuple[int, int]], n: int
) -> None:
    """What a front connection does before serving: start now or wait for a turn."""
    if not pacer.may_start():
        await pacer.wait()
    log.append((n, iterations.now))


def run(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
    scenario: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_burst_runs_at_most_per_iteration_starts_in_each_iteration_in_order(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pacer = StartPacer(loop, PER_ITERATION)
        iterations = IterationCounter(loop)
        log: list[tuple[int, int]] = []
        burst = 3 * PER_ITERATION + 5
        await asyncio.gather(*(start(pacer, iterations, log, n) for n in range(burst)))
        iterations.stop()
        assert [n for n, _ in log] == list(range(burst))  # arrival order kept
        per_iteration: dict[int, int] = {}
        for _, iteration in log:
            per_iteration[iteration] = per_iteration.get(iteration, 0) + 1
        assert max(per_iteration.values()) == PER_ITERATION
        assert len(per_iteration) == 4  # 8 + 8 + 8 + 5
        assert pacer.waiting == 0

    run(new_loop, scenario)


@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_lone_start_and_the_first_of_each_iteration_never_wait(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def scenario() -> None:
        pacer = StartPacer(asyncio.get_running_loop(), PER_ITERATION)
        for _ in range(3 * PER_ITERATION):
            assert pacer.may_start()
            await asyncio.sleep(0)  # the next iteration: its count starts again
        for _ in range(PER_ITERATION):
            assert pacer.may_start()
        assert not pacer.may_start()  # one iteration's share is spent

    run(new_loop, scenario)


@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_cancelled_waiter_gives_its_turn_to_the_next(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pacer = StartPacer(loop, PER_ITERATION)
        iterations = IterationCounter(loop)
        log: list[tuple[int, int]] = []
        burst = 2 * PER_ITERATION
        tasks = [loop.create_task(start(pacer, iterations, log, n)) for n in range(burst)]
        await asyncio.sleep(0)  # all have run once: the first 8 started, 8 wait
        assert pacer.waiting == PER_ITERATION
        for task in tasks[PER_ITERATION : PER_ITERATION + 3]:  # three clients hang up
            task.cancel()
        late = loop.create_task(start(pacer, iterations, log, burst))
        await asyncio.gather(*tasks, late, return_exceptions=True)
        iterations.stop()
        when = dict(log)
        assert sorted(when) == [*range(PER_ITERATION), *range(PER_ITERATION + 3, burst), burst]
        # The three cancelled turns were not counted: the five still waiting start in one
        # iteration, and the late start takes a sixth place without waiting behind them.
        assert len({when[n] for n in range(PER_ITERATION + 3, burst)}) == 1
        assert when[burst] <= when[burst - 1]
        assert pacer.waiting == 0

    run(new_loop, scenario)


def test_per_iteration_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        StartPacer(asyncio.new_event_loop(), 0)
