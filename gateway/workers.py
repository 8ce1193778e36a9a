"""``meshgate serve --workers N``: N worker processes serve one port, and this process is
their signal process and supervisor.

- Each worker binds the listening address with SO_REUSEPORT (the kernel spreads new
  connections over them) and serves the whole app; its scorer reads the fleet state
  array in shared memory (gateway/shared_fleet.py) and it counts its in-flight requests
  there atomically, so every worker routes with every worker's load.
- This process discovers and scrapes the fleet once for all of them
  (gateway/signal_process.py); workers neither discover nor scrape.
- Limits: each worker enforces 1/N of every admission and tenant limit (see
  ``worker_config``). Prometheus ``/metrics``, a model's admitted count and outlier
  records in ``/admin/fleet`` are per worker: each answer is the answering worker's.
- Lifecycle: SIGTERM or SIGINT here is forwarded (as SIGTERM) to every worker, which
  drains as a single-process gateway does; this process exits once they have, 0 when
  all exited 0. A worker that dies is restarted, after its in-flight counts are taken
  back out of the shared array (its ledger row); one that fails to start (say, the
  port is taken) stops the gateway with exit code 1, as a restart would fail again.
  Workers leave when this process dies, whatever killed it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import replace
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Lock
from pathlib import Path

import aiohttp
import uvloop

from adapters.deltas import every
from fastpath.inflight import InflightCounter

from .config import ConfigError, GatewayConfig
from .fleet import Fleet
from .fleet_state import FleetState
from .logs import setup_logging
from .shared_fleet import SharedFleetMemory
from .signal_process import SignalProcess, SignalProcessClient

log = logging.getLogger("meshgate.workers")

# A worker's exit code when it could not start serving: restarting it would not help.
WORKER_BOOT_FAILED = 3
_SUPERVISE_INTERVAL_S = 0.2
# After drain_timeout_s, how long workers get to exit before they are killed.
_EXIT_GRACE_S = 10.0


def default_workers() -> int:
    """One worker per core this process may run on."""
    return len(os.sched_getaffinity(0))


def worker_config(config: GatewayConfig, workers: int) -> GatewayConfig:
    """``config`` as each of ``workers`` workers enforces it: 1/workers of every admission
    limit and tenant limit (counts rounded up, 0 = unlimited stays 0).

    So the gateway as a whole admits no more than configured. The kernel spreads
    connections, not requests, evenly: with few long-lived connections one worker may
    refuse while another has room (run fewer workers for a handful of clients)."""

    def share(limit: int) -> int:
        return -(-limit // workers)

    admission = config.admission
    tenants = tuple(
        replace(
            tenant,
            limits=replace(
                tenant.limits,
                requests_per_second=tenant.limits.requests_per_second / workers,
                max_concurrent=share(tenant.limits.max_concurrent),
                tokens_per_minute=tenant.limits.tokens_per_minute / workers,
            ),
        )
        for tenant in config.tenants
    )
    return replace(
        config,
        admission=replace(
            admission,
            max_inflight=share(admission.max_inflight),
            max_inflight_hard=share(admission.max_inflight_hard),
            model_max_inflight=share(admission.model_max_inflight),
            model_max_inflight_hard=share(admission.model_max_inflight_hard),
        ),
        tenants=tenants,
    )


def serve_workers(config: GatewayConfig, workers: int) -> int:
    """Run the gateway as ``workers`` processes until SIGTERM/SIGINT; the exit code."""
    log_writer = setup_logging(config.log_level)
    try:
        return uvloop.run(_supervise(config, workers))
    finally:
        log_writer.stop()


async def _supervise(config: GatewayConfig, workers: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    memory = SharedFleetMemory.create(config.max_slots, workers)
    directory = Path(tempfile.mkdtemp(prefix="meshgate-"))  # 0700: only we reach the socket
    signals = SignalProcess(config, memory, directory / "signals.sock")
    try:
        await signals.start()
        return await WorkerPool(config, workers, memory, signals.socket).run(stop)
    finally:
        await signals.close()
        memory.unlink()
        shutil.rmtree(directory, ignore_errors=True)


class WorkerPool:
    """The worker processes: started, restarted when they die, stopped on ``stop``."""

    def __init__(
        self, config: GatewayConfig, workers: int, memory: SharedFleetMemory, socket: Path
    ) -> None:
        self._config = config
        self._memory = memory
        self._socket = socket
        # Spawned, not forked: this process already runs gRPC channels and an event loop.
        self._context = multiprocessing.get_context("spawn")
        self._lock = self._context.Lock()  # the pure-Python in-flight twin's (InflightCounter)
        self._workers = workers
        self._processes: list[BaseProcess] = []
        self._failed = False

    async def run(self, stop: asyncio.Event) -> int:
        """Start the workers, keep them running until ``stop``, then stop them; returns
        the gateway's exit code."""
        if stop.is_set():
            return 0
        self._processes = [self._spawn(index) for index in range(self._workers)]
        await every(_SUPERVISE_INTERVAL_S, stop, lambda: self._check(stop))
        return await self._stop()

    def _spawn(self, index: int) -> BaseProcess:
        process = self._context.Process(
            target=_worker,
            args=(self._config, index, self._workers, self._memory.name, self._socket, self._lock),
            name=f"meshgate-worker-{index}",
        )
        process.start()
        log.info("worker %d started as pid %d", index, process.pid)
        return process

    async def _check(self, stop: asyncio.Event) -> None:
        for index, process in enumerate(self._processes):
            if process.is_alive():
                continue
            if process.exitcode == WORKER_BOOT_FAILED:
                log.error("worker %d could not start: stopping the gateway", index)
                self._failed = True
                stop.set()
                return
            log.warning(
                "worker %d (pid %d) exited with code %s: restarting it",
                index,
                process.pid,
                process.exitcode,
            )
            ledger = self._memory.ledgers[index]
            InflightCounter(self._memory.state, ledger, self._lock).reclaim()
            self._processes[index] = self._spawn(index)

    async def _stop(self) -> int:
        for process in self._processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker drains
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.drain_timeout_s + _EXIT_GRACE_S
        while any(p.is_alive() for p in self._processes) and loop.time() < deadline:
            await asyncio.sleep(_SUPERVISE_INTERVAL_S)
        for process in self._processes:
            if process.is_alive():
                log.warning("worker pid %d did not exit after draining: killed", process.pid)
                process.kill()
            process.join()
        failed = self._failed or any(p.exitcode != 0 for p in self._processes)
        return 1 if failed else 0


def _worker(
    config: GatewayConfig, index: int, workers: int, memory_name: str, socket: Path, lock: Lock
) -> None:
    """A worker process: the whole app on the shared port, routing with the shared state."""
    from .cli import run_gateway  # cli imports this module

    # Terminal signals reach the supervisor alone, which forwards one SIGTERM.
    os.setpgrp()
    _exit_with_parent()
    memory = SharedFleetMemory.attach(memory_name, config.max_slots, workers)
    inflight = InflightCounter(memory.state, memory.ledgers[index], lock)
    fleet = Fleet(
        config,
        FleetState(config.max_slots, memory.state, inflight),
        SignalProcessClient(socket, memory),
    )
    try:
        run_gateway(worker_config(config, workers), fleet=fleet, reuse_port=True)
    except (OSError, ConfigError, aiohttp.ClientError) as exc:
        print(f"meshgate worker {index}: could not start: {exc}", file=sys.stderr, flush=True)
        sys.exit(WORKER_BOOT_FAILED)


def _exit_with_parent() -> None:
    """Drain and exit (SIGTERM to this process) when the supervisor is gone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
