# cython: language_level=3
"""In-flight counts shared by worker processes, compiled: see ``_inflight_py`` for the
design. ``add`` is one atomic compare-and-swap on the float64 cell, so the scorer keeps
reading a plain float64 INFLIGHT column (no per-worker columns to sum in its hot loop)."""

from .state import INFLIGHT as _INFLIGHT_COLUMN

cdef extern from *:
    """
    /* GCC and Clang have no atomic add on doubles: compare-and-swap on the whole value.
       Counts stay exact integers (below 2**53), so adding +-1.0 never rounds. */
    static inline void meshgate_atomic_add_double(double *cell, double delta) {
        double seen, wanted;
        __atomic_load(cell, &seen, __ATOMIC_RELAXED);
        do {
            wanted = seen + delta;
        } while (!__atomic_compare_exchange(cell, &seen, &wanted, 1,
                                            __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    }
    """
    void meshgate_atomic_add_double(double *cell, double delta) nogil

cdef Py_ssize_t INFLIGHT = _INFLIGHT_COLUMN


cdef class InflightCounter:
    """Adds to ``state[:, INFLIGHT]`` (shared by processes) and to ``ledger`` (this
    process's own int64 row, one entry per slot). ``lock`` is unused here (the pure twin
    takes it); it is accepted so both twins are built alike."""

    cdef double[:, ::1] _state
    cdef long long[::1] _ledger

    def __init__(self, state, ledger, lock):
        if ledger.shape[0] != state.shape[0]:
            raise ValueError(f"ledger: expected {state.shape[0]} slots, got {ledger.shape[0]}")
        self._state = state
        self._ledger = ledger

    cpdef void add(self, Py_ssize_t slot, long long delta) except *:
        """Count ``delta`` more requests in flight on ``slot`` (negative: fewer)."""
        if slot < 0 or slot >= self._ledger.shape[0]:
            raise IndexError(f"slot {slot} is outside the state array")
        self._ledger[slot] += delta
        meshgate_atomic_add_double(&self._state[slot, INFLIGHT], <double>delta)

    def reclaim(self):
        """Take everything this ledger holds back out of the column and zero the ledger:
        for a worker that died with requests in flight (call it on that worker's row)."""
        cdef Py_ssize_t slot
        cdef long long held
        for slot in range(self._ledger.shape[0]):
            held = self._ledger[slot]
            if held:
                self._ledger[slot] = 0
                meshgate_atomic_add_double(&self._state[slot, INFLIGHT], <double>-held)
