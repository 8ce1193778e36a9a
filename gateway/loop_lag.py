"""Event-loop lag: how late the loop wakes a task whose timer is due.

Every request this process serves waits that long behind whatever held the loop (a
slow callback, a long synchronous stretch, garbage collection, a starved CPU), so it is
the gateway's own stall, apart from any upstream's latency. One timer per interval is
the whole cost: at 50 ms, 20 wake-ups a second (at 10 ms the watcher was ~1.4% of a
core on an idle gateway, measured with a CPU-time profile). A stall of any length
still shows in full, as the lateness of the wake-up it delays. Resolution is about a
millisecond: uvloop's timers count whole ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

INTERVAL_S = 0.05


async def watch_loop_lag(
    record: Callable[[float], None], stop: asyncio.Event, interval: float = INTERVAL_S
) -> None:
    """Sleep ``interval`` seconds again and again until ``stop`` is set, passing
    ``record`` how many seconds late each wake-up came (never negative)."""
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(interval)
        # A timer may fire a fraction of a millisecond early (uvloop's cached clock).
        record(max(0.0, time.perf_counter() - started - interval))
