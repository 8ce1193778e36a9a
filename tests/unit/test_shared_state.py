"""The fleet state shared by worker processes: in-flight counts stay exact when several
processes count at once, a dead worker's counts can be taken back, and every process
sees one slot layout. Real processes (spawned, as the gateway's workers are)."""

from __future__ import annotations

import math
import multiprocessing
import os
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Lock
from types import ModuleType

import numpy as np
import pytest

from fastpath import NO_EXTENSIONS, inflight
from fastpath import state as S
from gateway.config import GatewayConfig, TenantSpec
from gateway.fleet_state import FleetState
from gateway.shared_fleet import SharedFleetMemory
from gateway.workers import worker_config

SPAWN = multiprocessing.get_context("spawn")
CAPACITY = 8
ROUNDS = 10_000

TWINS = [pytest.param("py", id="py")]
if inflight.inflight_c is not None:
    TWINS.append(pytest.param("c", id="c"))


def twin(name: str) -> ModuleType:
    module = inflight.inflight_c if name == "c" else inflight.inflight_py
    assert module is not None
    return module


@pytest.fixture
def memory() -> SharedFleetMemory:
    shared = SharedFleetMemory.create(CAPACITY, workers=2)
    yield shared
    shared.unlink()


def test_compiled_twin_loaded() -> None:
    if NO_EXTENSIONS:
        assert inflight.inflight_c is None and not inflight.COMPILED
        assert inflight.InflightCounter is inflight.inflight_py.InflightCounter
    else:
        assert inflight.COMPILED
        assert inflight.InflightCounter is inflight.inflight_c.InflightCounter


def _count(name: str, memory_name: str, worker: int, lock: Lock, start: object) -> None:
    """A worker's traffic: every slot up and down ROUNDS times, ending where it began."""
    memory = SharedFleetMemory.attach(memory_name, CAPACITY, 2)
    counter = twin(name).InflightCounter(memory.state, memory.ledgers[worker], lock)
    start.wait()  # type: ignore[attr-defined]
    for i in range(ROUNDS):
        slot = i % CAPACITY
        counter.add(slot, 1)
        counter.add((slot + 3) % CAPACITY, 1)
        counter.add(slot, -1)
        counter.add((slot + 3) % CAPACITY, -1)


@pytest.mark.parametrize("name", TWINS)
def test_two_processes_counting_at_once_end_at_exactly_zero(
    name: str, memory: SharedFleetMemory
) -> None:
    lock = SPAWN.Lock()
    start = SPAWN.Event()
    workers = [
        SPAWN.Process(target=_count, args=(name, memory.name, w, lock, start)) for w in (0, 1)
    ]
    for process in workers:
        process.start()
    start.set()
    for process in workers:
        process.join(120)
        assert process.exitcode == 0
    assert memory.state[:, S.INFLIGHT].tolist() == [0.0] * CAPACITY
    assert memory.ledgers.tolist() == [[0] * CAPACITY, [0] * CAPACITY]


def _die_with_requests(name: str, memory_name: str, lock: Lock) -> None:
    memory = SharedFleetMemory.attach(memory_name, CAPACITY, 2)
    counter = twin(name).InflightCounter(memory.state, memory.ledgers[1], lock)
    for _ in range(3):
        counter.add(2, 1)
    counter.add(5, 1)
    os._exit(9)  # as a crash: nothing is released


@pytest.mark.parametrize("name", TWINS)
def test_reclaim_takes_a_dead_workers_counts_back(name: str, memory: SharedFleetMemory) -> None:
    lock = SPAWN.Lock()
    survivor = twin(name).InflightCounter(memory.state, memory.ledgers[0], lock)
    survivor.add(2, 1)
    process = SPAWN.Process(target=_die_with_requests, args=(name, memory.name, lock))
    process.start()
    process.join(60)
    assert process.exitcode == 9
    assert memory.state[[2, 5], S.INFLIGHT].tolist() == [4.0, 1.0]
    twin(name).InflightCounter(memory.state, memory.ledgers[1], lock).reclaim()
    assert memory.state[[2, 5], S.INFLIGHT].tolist() == [1.0, 0.0]  # the survivor's
    assert memory.ledgers[1].tolist() == [0] * CAPACITY


def _adopt(memory_name: str, slot_keys: list[tuple[str, str]], reply: Connection) -> None:
    memory = SharedFleetMemory.attach(memory_name, CAPACITY, 2)
    lock = SPAWN.Lock()
    counter = inflight.InflightCounter(memory.state, memory.ledgers[1], lock)
    state = FleetState(CAPACITY, memory.state, counter)
    state.adopt(slot_keys)
    state.dispatched(state.slot("b1", "m"))  # a known slot: found, not allocated
    candidates = {model: state.candidates(model).tolist() for model in ("m", "n")}
    row = memory.state[state.slot("b0", "n")]
    reply.send((state.slot_keys, state.model_index, candidates, row[S.READY], row[S.SIGNAL_AT]))


def test_a_worker_sees_the_signal_process_layout(memory: SharedFleetMemory) -> None:
    owner = FleetState(CAPACITY, memory.state)
    owner.expect_runtime_signal("b0")
    for key in [("b0", "m"), ("b1", "m"), ("b0", "n")]:
        owner.slot(*key)
    owner.set_ready(owner.slot("b0", "n"), True)
    receive, send = SPAWN.Pipe(duplex=False)
    process = SPAWN.Process(target=_adopt, args=(memory.name, owner.slot_keys, send))
    process.start()
    slot_keys, model_index, candidates, ready, signal_at = receive.recv()
    process.join(60)
    assert slot_keys == owner.slot_keys
    assert model_index == owner.model_index
    assert candidates == {m: owner.candidates(m).tolist() for m in ("m", "n")}
    assert ready == 1.0 and math.isnan(signal_at)  # rows as the owner wrote them
    assert memory.state[owner.slot("b1", "m"), S.INFLIGHT] == 1.0


def test_adopt_refuses_a_layout_that_renumbers_slots() -> None:
    state = FleetState(4)
    state.adopt([("b0", "m")])
    state.adopt([("b0", "m"), ("b1", "m")])
    assert state.candidates("m").tolist() == [0, 1]
    with pytest.raises(ValueError, match="does not extend"):
        state.adopt([("b1", "m"), ("b0", "m")])


def test_new_state_over_a_buffer_matches_a_private_one() -> None:
    buffer = memoryview(bytearray(CAPACITY * S.NFIELDS * 8))
    shared = S.new_state(CAPACITY, buffer)
    assert np.array_equal(shared, S.new_state(CAPACITY), equal_nan=True)
    shared[3, S.QUEUE_DEPTH] = 7.0
    assert S.state_view(CAPACITY, buffer)[3, S.QUEUE_DEPTH] == 7.0


def test_each_worker_enforces_its_share_of_every_limit() -> None:
    from fastpath.tenants import TenantLimits

    tenant = TenantSpec("t", ("0" * 64,), TenantLimits(10.0, 5, 600.0))
    config = worker_config(GatewayConfig(tenants=(tenant,)), 4)
    assert config.admission.max_inflight == 256  # 1024 / 4
    assert config.admission.max_inflight_hard == 320
    assert config.admission.model_max_inflight == 64
    assert config.admission.model_max_inflight_hard == 80
    assert config.tenants[0].limits == TenantLimits(2.5, 2, 150.0)  # 5 / 4 rounded up
    unlimited = TenantSpec("u", ("1" * 64,), TenantLimits())
    assert worker_config(GatewayConfig(tenants=(unlimited,)), 4).tenants[0].limits == (
        TenantLimits()
    )
