"""The shared memory of a gateway running ``--workers N``: one segment that the signal
process creates (and unlinks at exit) and every worker maps.

Layout, 8-byte aligned::

    [generation: uint64, padded to 64 bytes]       bumped when the fleet layout changes
    [state: float64 (capacity, NFIELDS)]           fastpath.state's array, read by scorers
    [ledgers: int64 (workers, capacity)]           each worker's own in-flight per slot

Who writes what: the signal process alone writes the generation and the signal
columns (readiness, queue depth, KV cache, VRAM, freshness) and allocates slots;
workers add to INFLIGHT atomically (fastpath.inflight) and keep their ledger row;
TTFT/TPOT EWMAs, circuit state and drain flags are plain 8-byte stores from whichever
worker observed them (last writer wins: an EWMA may lose a sample to a concurrent one).

The segment is created through ``multiprocessing.shared_memory`` (its resource tracker
unlinks it if the gateway dies without doing so) but mapped with ``mmap`` from
``/dev/shm``: numpy views then keep the mapping alive themselves, and nothing has to be
closed while they exist. Linux only, as is the connection balancing of SO_REUSEPORT.
"""

from __future__ import annotations

import mmap
import os
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from fastpath import state as S

_SHM_DIR = Path("/dev/shm")
_HEADER_BYTES = 64


def segment_bytes(capacity: int, workers: int) -> int:
    return _HEADER_BYTES + capacity * S.NFIELDS * 8 + workers * capacity * 8


class SharedFleetMemory:
    """The mapped segment: ``state``, ``ledgers`` and the layout ``generation``."""

    def __init__(
        self,
        name: str,
        capacity: int,
        workers: int,
        owner: shared_memory.SharedMemory | None = None,
    ) -> None:
        self.name = name
        self.capacity = capacity
        self.workers = workers
        self._owner = owner
        fd = os.open(_SHM_DIR / name.lstrip("/"), os.O_RDWR)
        try:
            mapped = memoryview(mmap.mmap(fd, segment_bytes(capacity, workers)))
        finally:
            os.close(fd)
        state_end = _HEADER_BYTES + capacity * S.NFIELDS * 8
        self._generation = np.frombuffer(mapped[:8], dtype=np.uint64)
        state = mapped[_HEADER_BYTES:state_end]
        # The creator lays out empty slots; the others take what is there.
        self.state = S.new_state(capacity, state) if owner else S.state_view(capacity, state)
        self.ledgers = np.frombuffer(mapped[state_end:], dtype=np.int64).reshape(workers, capacity)

    @classmethod
    def create(cls, capacity: int, workers: int) -> SharedFleetMemory:
        """A new segment with empty slots and zero ledgers; ``unlink`` removes it."""
        owner = shared_memory.SharedMemory(create=True, size=segment_bytes(capacity, workers))
        owner.close()  # only its name and unlink() are used: see the module docstring
        return cls(owner.name, capacity, workers, owner)

    @classmethod
    def attach(cls, name: str, capacity: int, workers: int) -> SharedFleetMemory:
        """The segment ``create`` made, as it is."""
        return cls(name, capacity, workers)

    def unlink(self) -> None:
        """Remove the segment's name (the creator, at exit); mappings stay valid."""
        if self._owner is not None:
            self._owner.unlink()
            self._owner = None

    @property
    def generation(self) -> int:
        """Bumped by the signal process each time the fleet layout it publishes changes."""
        return int(self._generation[0])

    def bump_generation(self) -> int:
        self._generation[0] += 1
        return self.generation
