"""In-flight counts shared by worker processes: the pure-Python twin of ``_inflight_c``.

With ``--workers N`` every worker adds to the INFLIGHT column of one state array in
shared memory, so each scorer sees the requests of all workers. A ``+=`` on shared
memory is a read-modify-write that two processes can interleave and lose an update;
the compiled twin adds with one atomic compare-and-swap, and this twin, which has no
atomic instruction, holds a process-shared lock around its ``+=``. The scorer keeps
reading a plain float64 column either way: its hot loop does not change with workers.

Each worker also keeps its own count per slot in a ledger row that only it writes:
when a worker dies, ``reclaim`` on its row takes back what it left in the column.
"""

from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from .state import INFLIGHT


class InflightCounter:
    """Adds to ``state[:, INFLIGHT]`` (shared by processes) and to ``ledger`` (this
    process's own int64 row, one entry per slot).

    ``lock``: held around the pure-Python twin's read-modify-write; the compiled twin
    adds atomically and never takes it.
    """

    def __init__(
        self, state: np.ndarray, ledger: np.ndarray, lock: AbstractContextManager[Any]
    ) -> None:
        if ledger.shape[0] != state.shape[0]:
            raise ValueError(f"ledger: expected {state.shape[0]} slots, got {ledger.shape[0]}")
        self._state = state
        self._ledger = ledger
        self._lock = lock

    def add(self, slot: int, delta: int) -> None:
        """Count ``delta`` more requests in flight on ``slot`` (negative: fewer)."""
        if not 0 <= slot < self._ledger.shape[0]:
            raise IndexError(f"slot {slot} is outside the state array")
        self._ledger[slot] += delta
        with self._lock:
            self._state[slot, INFLIGHT] += delta

    def reclaim(self) -> None:
        """Take everything this ledger holds back out of the column and zero the ledger:
        for a worker that died with requests in flight (call it on that worker's row)."""
        for slot in np.flatnonzero(self._ledger).tolist():
            held = int(self._ledger[slot])
            self._ledger[slot] = 0
            with self._lock:
                self._state[slot, INFLIGHT] -= held
