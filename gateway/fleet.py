"""The fleet: which Triton backend serves which model, kept current in the background.

Discovery reads each backend's repository index every ``discovery_interval_s`` and
marks each (backend, model) slot of the state array READY or not; the signal plane
(runtime scrapers, GPU deltas) writes load into the same slots. The data plane reads
``Fleet.candidates`` and the array, and never waits on discovery.

With ``--workers N`` discovery and the signal plane run once, in the signal process
(gateway/signal_process.py), whose fleet publishes its ``layout``; each worker's fleet
is a *follower*: it ``adopt``s every new layout (opening and closing its own channels
to the backends) instead of discovering, and asks the signal process for what only
that process holds (``view``, ``apply_deltas``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from adapters.deltas import Delta, Ticks
from fastpath.state import INFLIGHT, READY

from .config import BackendSpec, GatewayConfig
from .discovery import DnsDiscovery, system_resolver
from .errors import ModelGone, NotFound, Unavailable
from .fleet_state import FleetState
from .http_stream import StreamPool
from .http_upstream import HttpPool
from .upstream import TritonChannel

log = logging.getLogger("meshgate.fleet")

_CONTROL_TIMEOUT_S = 5.0
# How often a leaving backend's in-flight count is checked.
_DRAIN_POLL_S = 0.1
# How often a worker's fleet checks whether the signal process published a new layout.
_FOLLOW_POLL_S = 0.1


@dataclass(frozen=True)
class InputSpec:
    datatype: str  # KServe name, e.g. "FP32", "BYTES"
    dims: tuple[int, ...]  # without the batch dimension
    optional: bool


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway needs to know about one model version on one backend."""

    name: str
    version: str
    max_batch_size: int
    decoupled: bool
    inputs: dict[str, InputSpec]
    outputs: tuple[str, ...]

    @classmethod
    def from_config(cls, version: str, config: pb.ModelConfigResponse) -> ModelInfo:
        cfg = config.config
        inputs = {
            i.name: InputSpec(_kserve_datatype(i.data_type), tuple(i.dims), i.optional)
            for i in cfg.input
        }
        return cls(
            name=cfg.name,
            version=version,
            max_batch_size=cfg.max_batch_size,
            decoupled=cfg.model_transaction_policy.decoupled,
            inputs=inputs,
            outputs=tuple(o.name for o in cfg.output),
        )


def _kserve_datatype(config_type: int) -> str:
    # ModelConfig says TYPE_FP32 / TYPE_STRING; the inference protocol says FP32 / BYTES.
    name = pb.model__config__pb2.DataType.Name(config_type)[len("TYPE_") :]
    return "BYTES" if name == "STRING" else name


@dataclass
class Backend:
    spec: BackendSpec
    channel: TritonChannel
    http: HttpPool | None  # Triton's HTTP endpoint, when configured: unary infer goes there
    streams: StreamPool | None  # the same endpoint's connections for generate_stream
    reachable: bool = False
    ready: bool = False
    # model name -> version -> info, for the versions READY on this backend
    models: dict[str, dict[str, ModelInfo]] = field(default_factory=dict)
    # every model name in the repository index, whatever its state
    known_models: frozenset[str] = frozenset()
    # every (model, version) in the repository index, whatever its state
    known_versions: frozenset[tuple[str, str]] = frozenset()
    last_error: str = ""

    @property
    def id(self) -> str:
        return self.spec.id

    def knows(self, model: str, version: str) -> bool:
        """Whether the repository index lists ``model`` (that version, if one is given)."""
        return (model, version) in self.known_versions if version else model in self.known_models


@dataclass(frozen=True)
class BackendStatus:
    """What discovery knows about one backend: what a worker needs to route to it."""

    spec: BackendSpec
    reachable: bool
    ready: bool
    models: dict[str, dict[str, ModelInfo]]
    known_models: frozenset[str]
    known_versions: frozenset[tuple[str, str]]
    last_error: str

    @classmethod
    def of(cls, backend: Backend) -> BackendStatus:
        return cls(
            backend.spec,
            backend.reachable,
            backend.ready,
            backend.models,
            backend.known_models,
            backend.known_versions,
            backend.last_error,
        )

    def update(self, backend: Backend) -> None:
        backend.reachable = self.reachable
        backend.ready = self.ready
        backend.models = self.models
        backend.known_models = self.known_models
        backend.known_versions = self.known_versions
        backend.last_error = self.last_error


@dataclass(frozen=True)
class FleetLayout:
    """The signal process's fleet as workers adopt it: every slot's (backend, model) in
    slot order (append-only, so model indexes follow too) and every backend's status."""

    slot_keys: tuple[tuple[str, str], ...]
    backends: tuple[BackendStatus, ...]


class SignalProcessLink(Protocol):
    """A worker's way to the signal process (gateway/signal_process.py)."""

    async def layout(self) -> FleetLayout:
        """The layout published now."""
        ...

    async def newer_layout(self) -> FleetLayout | None:
        """The layout published now if it changed since the last one fetched, else None."""
        ...

    async def describe(self) -> list[dict[str, Any]]:
        """``Fleet.describe`` of the signal process's fleet."""
        ...

    async def apply_deltas(self, deltas: list[Delta]) -> int:
        """``Fleet.apply_deltas`` in the signal process."""
        ...

    async def close(self) -> None: ...


class FleetListener(Protocol):
    """Told when a backend joins or leaves the fleet at run time (the signal plane)."""

    def backend_added(self, spec: BackendSpec) -> None: ...

    def backend_removed(self, backend_id: str) -> None: ...


class Fleet:
    def __init__(
        self,
        config: GatewayConfig,
        state: FleetState | None = None,
        signal_process: SignalProcessLink | None = None,
    ) -> None:
        """``state``: the state to write (shared memory), else a new one of max_slots;
        ``signal_process``: makes this fleet a worker's follower of that process."""
        self._specs = config.backends
        self._dns = (
            DnsDiscovery(config.dns_backends, config.resolver or system_resolver)
            if config.dns_backends
            else None
        )
        self._dns_interval = config.dns_interval_s
        self._drain_timeout = config.drain_timeout_s
        self._max_message_bytes = config.max_body_bytes + 1024 * 1024
        self.backends: list[Backend] = []
        self.by_id: dict[str, Backend] = {}
        self.listeners: list[FleetListener] = []
        # Backends draining before they leave, by id: the task that drops them.
        self._leaving: dict[str, asyncio.Task[None]] = {}
        self._interval = config.discovery_interval_s
        self.state = FleetState(config.max_slots) if state is None else state
        self._signal_process = signal_process
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Open a channel per backend (inside the running loop, as grpc.aio needs),
        discover the fleet once, then keep discovering (and resolving) in the background;
        a follower adopts the published layout instead, and keeps following it."""
        if self._signal_process is not None:
            await self.adopt(await self._signal_process.layout())
            self._tasks.append(asyncio.create_task(self._follow_forever(), name="fleet-follow"))
            return
        await self.set_backends(await self._wanted())
        self._tasks.append(asyncio.create_task(self._discover_forever(), name="fleet-discovery"))
        if self._dns is not None:
            self._tasks.append(asyncio.create_task(self._resolve_forever(), name="dns-discovery"))

    async def close(self) -> None:
        tasks = [*self._tasks, *self._leaving.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(_close(b) for b in self.backends))
        if self._signal_process is not None:
            await self._signal_process.close()

    # -- membership -------------------------------------------------------------------

    async def set_backends(self, specs: list[BackendSpec]) -> None:
        """Make ``specs`` the fleet: new ones join (see add_backend), missing ones leave
        (see remove_backend) without waiting for their drain."""
        wanted = {spec.id for spec in specs}
        for backend_id in [b.id for b in self.backends if b.id not in wanted]:
            self.remove_backend(backend_id)
        await asyncio.gather(*(self.add_backend(spec) for spec in specs))

    async def add_backend(self, spec: BackendSpec) -> None:
        """Open the backend and discover it at once; a draining backend with this id
        stops draining instead. A backend already serving is left as it is."""
        leaving = self._leaving.pop(spec.id, None)
        if leaving is not None:
            leaving.cancel()
            self.state.set_draining(spec.id, False)
            log.info("backend %s is back before it left", spec.id)
            return
        if spec.id in self.by_id:
            return
        if spec.metrics_url:
            self.state.expect_runtime_signal(spec.id)
        backend = self._open(spec)
        # A rejoining id reuses its slots, which may still say draining.
        self.state.set_draining(spec.id, False)
        for listener in self.listeners:
            listener.backend_added(spec)
        await self._refresh_backend(backend)
        self._mark_slots(backend)

    def remove_backend(self, backend_id: str) -> asyncio.Task[None]:
        """Drain the backend, then drop it: new requests avoid it at once; it leaves (its
        scraper stops, its channel closes) when its in-flight requests are done, or after
        ``drain_timeout_s``. Returns the task that drops it."""
        task = self._leaving.get(backend_id)
        if task is None:
            self.state.set_draining(backend_id, True)
            task = asyncio.create_task(self._leave(backend_id), name=f"leave-{backend_id}")
            self._leaving[backend_id] = task
        return task

    async def _leave(self, backend_id: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_timeout
        slots = self.state.slots_of(backend_id)
        while (inflight := int(self.state.array[slots, INFLIGHT].sum())) and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        if inflight:
            log.warning("backend %s left with %d requests in flight", backend_id, inflight)
        # From here on nothing awaits until the backend is gone: a rejoin either cancelled
        # the drain above or finds no trace of it and opens the backend afresh.
        del self._leaving[backend_id]
        backend = self.by_id.pop(backend_id)
        self.backends.remove(backend)
        for slot in slots:
            self.state.set_ready(slot, False)
        for listener in self.listeners:
            listener.backend_removed(backend_id)
        log.info("backend %s left the fleet", backend_id)
        await _close(backend)

    def _open(self, spec: BackendSpec) -> Backend:
        backend = Backend(
            spec,
            TritonChannel(spec.grpc_target, self._max_message_bytes, spec.tls),
            HttpPool(spec.http_target) if spec.http_target else None,
            StreamPool(spec.http_target) if spec.http_target else None,
        )
        self.backends.append(backend)
        self.by_id[spec.id] = backend
        return backend

    async def _wanted(self) -> list[BackendSpec]:
        resolved = await self._dns.resolve() if self._dns is not None else []
        return [*self._specs, *resolved]

    async def _resolve_forever(self) -> None:
        while True:
            await asyncio.sleep(self._dns_interval)
            try:
                await self.set_backends(await self._wanted())
            except Exception:  # DNS discovery must outlive any single bad answer
                log.exception("DNS discovery pass failed")

    # -- discovery --------------------------------------------------------------------

    async def refresh(self) -> None:
        """One discovery pass over every backend, each backend's slots marked READY or
        not as soon as its own answer (or failure) is in: its models and its slots
        change together, never a slot READY on a backend whose models are gone while
        a slower backend is still being asked."""
        await asyncio.gather(*(self._refresh_and_mark(b) for b in self.backends))

    async def _refresh_and_mark(self, backend: Backend) -> None:
        await self._refresh_backend(backend)
        self._mark_slots(backend)

    def _mark_slots(self, backend: Backend) -> None:
        for name in backend.known_models:
            slot = self.state.slot(backend.id, name)
            self.state.set_ready(slot, backend.ready and name in backend.models)

    async def _discover_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:  # discovery must outlive any single bad answer
                log.exception("fleet discovery pass failed")

    async def _refresh_backend(self, backend: Backend) -> None:
        control = backend.channel.control
        try:
            ready = await control.ServerReady(pb.ServerReadyRequest(), timeout=_CONTROL_TIMEOUT_S)
            index = await control.RepositoryIndex(
                pb.RepositoryIndexRequest(ready=False), timeout=_CONTROL_TIMEOUT_S
            )
            models: dict[str, dict[str, ModelInfo]] = {}
            for entry in index.models:
                if entry.state != "READY":
                    continue
                known = backend.models.get(entry.name, {}).get(entry.version)
                info = known or await self._model_info(backend, entry.name, entry.version)
                models.setdefault(entry.name, {})[entry.version] = info
        except grpc.aio.AioRpcError as exc:
            if backend.reachable:
                log.warning("backend %s unreachable: %s", backend.id, exc.code().name)
            backend.reachable = backend.ready = False
            backend.models = {}
            backend.last_error = exc.details() or exc.code().name
            return
        if not backend.reachable:
            log.info("backend %s reachable, %d models ready", backend.id, len(models))
        backend.reachable = True
        backend.ready = ready.ready
        backend.models = models
        backend.known_models = frozenset(e.name for e in index.models)
        backend.known_versions = frozenset((e.name, e.version) for e in index.models)
        backend.last_error = ""

    @staticmethod
    async def _model_info(backend: Backend, name: str, version: str) -> ModelInfo:
        config = await backend.channel.control.ModelConfig(
            pb.ModelConfigRequest(name=name, version=version), timeout=_CONTROL_TIMEOUT_S
        )
        return ModelInfo.from_config(version, config)

    # -- workers ----------------------------------------------------------------------

    @property
    def follows(self) -> bool:
        """Whether this is a worker's fleet, following the signal process's layout."""
        return self._signal_process is not None

    def layout(self) -> FleetLayout:
        """This fleet as the signal process publishes it to workers."""
        return FleetLayout(
            tuple(self.state.slot_keys), tuple(BackendStatus.of(b) for b in self.backends)
        )

    async def adopt(self, layout: FleetLayout) -> None:
        """Make this follower's fleet the published one: take the new slots, open
        backends that joined, update every backend's status, close those that left (the
        signal process let them go once the in-flight count, which counts every
        worker's requests, was 0, or after drain_timeout_s)."""
        self.state.adopt(list(layout.slot_keys))
        published = {status.spec.id: status for status in layout.backends}
        for status in layout.backends:
            backend = self.by_id.get(status.spec.id) or self._open(status.spec)
            status.update(backend)
        gone = [b for b in self.backends if b.id not in published]
        for backend in gone:
            self.backends.remove(backend)
            del self.by_id[backend.id]
        await asyncio.gather(*(_close(b) for b in gone))

    async def _follow_forever(self) -> None:
        assert self._signal_process is not None
        loop = asyncio.get_running_loop()
        ticks = Ticks(_FOLLOW_POLL_S)  # on the loop lag watcher's wake-ups
        while True:
            await asyncio.sleep(ticks.delay(loop.time()))
            try:
                layout = await self._signal_process.newer_layout()
                if layout is not None:
                    await self.adopt(layout)
            except Exception:  # following must outlive any single failed fetch
                log.exception("adopting the published fleet layout failed")

    async def view(self, now: float) -> list[dict[str, Any]]:
        """``describe``, from the process that holds the signals: this one, or for a
        follower the signal process (signal ages and GPU readings live only there)."""
        if self._signal_process is not None:
            return await self._signal_process.describe()
        return self.describe(now)

    async def apply_deltas(self, deltas: list[Delta]) -> int:
        """Apply pushed deltas of known backends in the process that owns the signals;
        returns how many were applied (the others were older than what was)."""
        if self._signal_process is not None:
            return await self._signal_process.apply_deltas(deltas)
        return sum(self.state.apply(d) for d in deltas if d.backend in self.by_id)

    # -- data plane -------------------------------------------------------------------

    def candidates(self, model: str, version: str = "") -> np.ndarray:
        """The slots that may serve ``model`` (the scorer filters out the unready ones).

        Raises NotFound for a model no backend knows and Unavailable when a version
        is asked for that no backend has READY.
        """
        slots = self.state.candidates(model)
        if slots is None:
            raise self._unroutable(model, version)
        if version:
            keys = self.state.slot_keys
            slots = np.array(
                [s for s in slots if version in self._models_at(keys[s][0], model)],
                dtype=np.int32,
            )
            if not len(slots):
                raise self._unroutable(model, version)
        return slots

    def ready_backends(self, model: str, version: str = "") -> list[Backend]:
        """Backends with ``model`` READY, for control-plane calls (no admission)."""
        ready = [
            self.backend_of(int(slot))
            for slot in self.candidates(model, version)
            if self.state.array[slot, READY] == 1.0
        ]
        if not ready:
            raise self._unroutable(model, version)
        return ready

    def _models_at(self, backend_id: str, model: str) -> dict[str, ModelInfo]:
        # A backend that left keeps its slots (never READY again) but not its entry.
        backend = self.by_id.get(backend_id)
        return backend.models.get(model, {}) if backend is not None else {}

    def backend_of(self, slot: int) -> Backend:
        return self.by_id[self.state.slot_keys[slot][0]]

    def model_info(self, backend: Backend, model: str, version: str = "") -> ModelInfo:
        """The model's (newest ready) version on ``backend``; ModelGone when discovery
        saw it go after the request was ranked (failover then tries the next backend)."""
        versions = backend.models.get(model, {})
        info = versions.get(version) if version else None
        if not version and versions:
            info = versions[max(versions, key=_version_key)]
        if info is None:
            label = f"'{model}' version {version}" if version else f"'{model}'"
            raise ModelGone(f"backend {backend.id} no longer has model {label} ready")
        return info

    def _unroutable(self, model: str, version: str) -> NotFound | Unavailable:
        # "Unknown" needs every backend's word for it; an unreachable one might serve it.
        all_answered = all(b.reachable for b in self.backends)
        label = f"'{model}' version {version}" if version else f"'{model}'"
        if all_answered and not any(b.knows(model, version) for b in self.backends):
            return NotFound(f"Request for unknown model: {label} is not found")
        return Unavailable(f"no backend has model {label} ready")

    # -- views ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return any(b.ready and b.models for b in self.backends)

    def any_ready_backend(self) -> Backend:
        for backend in self.backends:
            if backend.ready:
                return backend
        raise Unavailable("no backend is ready")

    def repository_index(self) -> list[dict[str, Any]]:
        """Triton's repository index, merged: a version is READY if READY anywhere."""
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for backend in self.backends:
            for name, versions in backend.models.items():
                for version in versions:
                    merged[(name, version)] = {"name": name, "version": version, "state": "READY"}
            for name in backend.known_models - backend.models.keys():
                merged.setdefault((name, ""), {"name": name, "state": "UNAVAILABLE", "reason": ""})
        ready_names = {name for name, version in merged if version}
        return [
            entry
            for (name, version), entry in sorted(merged.items())
            if version or name not in ready_names
        ]

    def describe(self, now: float) -> list[dict[str, Any]]:
        """Every backend with its health and, per model, its latest signals."""
        return [
            {
                "id": b.id,
                "target": b.spec.grpc_target,
                "metrics_url": b.spec.metrics_url,
                "reachable": b.reachable,
                "ready": b.ready,
                "last_error": b.last_error,
                "gpus": {
                    uuid: {"vram_used_bytes": u, "vram_total_bytes": t, "utilization": util}
                    for uuid, (u, t, util) in self.state.gpus.get(b.id, {}).items()
                },
                "models": {
                    self.state.slot_keys[slot][1]: self.state.describe_slot(slot, now)
                    for slot in self.state.slots_of(b.id)
                },
            }
            for b in self.backends
        ]


async def _close(backend: Backend) -> None:
    if backend.http is not None:
        backend.http.close()
    if backend.streams is not None:
        backend.streams.close()  # idle ones; streams under way close their own
    await backend.channel.close()


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)
