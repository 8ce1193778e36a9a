"""What held the event loop: its lag (how late it wakes a task whose timer is due) and
the garbage collections that ran on it.

Every request this process serves waits that long behind whatever held the loop (a
slow callback, a long synchronous stretch, garbage collection, a starved CPU), so it is
the gateway's own stall, apart from any upstream's latency. One timer per interval is
the whole cost: at 50 ms, 20 wake-ups a second (at 10 ms the watcher was ~1.4% of a
core on an idle gateway, measured with a CPU-time profile). A stall shows as the
lateness of the wake-up it delays, which is the part of it after that wake-up was due:
at least its length less one interval, so the readings are a lower bound on the
longest stall (a 50-100 ms full collection was read as 24 ms of lag, bench/README.md).
A collection's own length is exact in ``watch_gc_pauses``. Resolution is about a
millisecond: uvloop's timers count whole ones.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable

from adapters.deltas import Ticks

INTERVAL_S = 0.05


async def watch_loop_lag(
    record: Callable[[float], None], stop: asyncio.Event, interval: float = INTERVAL_S
) -> None:
    """Sleep ``interval`` seconds again and again until ``stop`` is set, passing
    ``record`` how many seconds late each wake-up came (never negative)."""
    loop = asyncio.get_running_loop()
    ticks = Ticks(interval)  # wake-ups shared with the process's other periodic timers
    while not stop.is_set():
        delay = ticks.delay(loop.time())
        started = time.perf_counter()
        await asyncio.sleep(delay)
        # A timer may fire a fraction of a millisecond early (uvloop's cached clock).
        record(max(0.0, time.perf_counter() - started - delay))


async def watch_gc_pauses(record: Callable[[int, float], None], stop: asyncio.Event) -> None:
    """Until ``stop`` is set, pass ``record`` the generation and the seconds of each
    garbage collection run on this thread, the loop's: a collection holds the loop for
    its whole length (a full one over 1,000 streams' objects took ~60 ms here,
    bench/README.md), so a lag reading can be told apart from a collection. One callback
    per collection is the whole cost. Collections run by the process's other threads
    (they allocate little) are not recorded: ``record`` runs on the loop's thread only."""
    loop_thread = threading.get_ident()
    started = 0.0

    def on_collection(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if threading.get_ident() != loop_thread:
            return
        if phase == "start":
            started = time.perf_counter()
        else:
            record(info["generation"], time.perf_counter() - started)

    gc.callbacks.append(on_collection)
    try:
        await stop.wait()
    finally:
        gc.callbacks.remove(on_collection)
