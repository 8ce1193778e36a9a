"""Request starts paced across event-loop iterations, so a burst cannot hold the loop.

Why: a request's start (middlewares, admission, scoring, the upstream call sent) runs
without yielding, ~150 µs here. When 1,000 streams were opened at once, all 1,000
arrived in one poll and their starts ran back to back in the next loop iteration: one
149 ms stall (bench/README.md, "1,000 concurrent streams"), during which no token of
any stream already running was relayed and no timer fired. With at most
``STARTS_PER_ITERATION`` starts per iteration, a burst is spread over several
iterations with the loop's other work between them.

A lone request never waits: it starts in the iteration it would have started in, for
the cost of one comparison (and one ``call_soon`` per iteration that has starts).
"""

from __future__ import annotations

import asyncio
import collections

# 64 starts at ~150 µs each hold the loop ~10 ms, a fifth of the 50 ms stall the
# gateway is meant to stay under (issue 8), while a burst of 1,000 still starts
# within 16 iterations.
STARTS_PER_ITERATION = 64


class StartPacer:
    """Lets at most ``per_iteration`` request starts run per loop iteration; the rest
    wait, in arrival order, for a later one.

    An iteration's count begins at its first start and ends when a ``call_soon``
    callback made then runs, that is, in the next iteration, where the waiting starts
    are let go first.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, per_iteration: int = STARTS_PER_ITERATION):
        if per_iteration < 1:
            raise ValueError(f"per_iteration must be at least 1, got {per_iteration}")
        self._loop = loop
        self._per_iteration = per_iteration
        self._started = 0  # starts in the current count
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    def may_start(self) -> bool:
        """True, and counted, when a start may run now; False when it must ``wait``."""
        if self._started >= self._per_iteration or self._waiting:
            return False
        if self._started == 0:
            self._loop.call_soon(self._next_iteration)
        self._started += 1
        return True

    async def wait(self) -> None:
        """Return in a later iteration, once this start's turn has come (the caller has
        been refused by ``may_start``). A cancelled waiter gives its place up."""
        waiter = self._loop.create_future()
        self._waiting.append(waiter)
        await waiter

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _next_iteration(self) -> None:
        self._started = 0
        waiting = self._waiting
        while waiting and self._started < self._per_iteration:
            waiter = waiting.popleft()
            if not waiter.done():  # a cancelled waiter: its client hung up
                waiter.set_result(None)
                self._started += 1
        if self._started:
            self._loop.call_soon(self._next_iteration)
