"""The fleet: which Triton backend serves which model, kept current in the background.

Discovery reads each backend's repository index every ``discovery_interval_s`` and
marks each (backend, model) slot of the state array READY or not; the signal plane
(runtime scrapers, GPU deltas) writes load into the same slots. The data plane reads
``Fleet.candidates`` and the array, and never waits on discovery.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from fastpath.state import READY

from .config import BackendSpec, GatewayConfig
from .errors import NotFound, Unavailable
from .fleet_state import FleetState
from .upstream import TritonChannel

log = logging.getLogger("meshgate.fleet")

_CONTROL_TIMEOUT_S = 5.0


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
    reachable: bool = False
    ready: bool = False
    # model name -> version -> info, for the versions READY on this backend
    models: dict[str, dict[str, ModelInfo]] = field(default_factory=dict)
    # every model name in the repository index, whatever its state
    known_models: frozenset[str] = frozenset()
    last_error: str = ""

    @property
    def id(self) -> str:
        return self.spec.id


class Fleet:
    def __init__(self, config: GatewayConfig) -> None:
        self._specs = config.backends
        self._max_message_bytes = config.max_body_bytes + 1024 * 1024
        self.backends: list[Backend] = []
        self.by_id: dict[str, Backend] = {}
        self._interval = config.discovery_interval_s
        self.state = FleetState(config.max_slots)
        for spec in self._specs:
            if spec.metrics_url:
                self.state.expect_runtime_signal(spec.id)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open a channel per backend (inside the running loop, as grpc.aio needs),
        discover the fleet once, then keep discovering in the background."""
        self.backends = [
            Backend(spec, TritonChannel(spec.grpc_target, self._max_message_bytes))
            for spec in self._specs
        ]
        self.by_id = {b.id: b for b in self.backends}
        await self.refresh()
        self._task = asyncio.create_task(self._discover_forever(), name="fleet-discovery")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(b.channel.close() for b in self.backends))

    async def refresh(self) -> None:
        """One discovery pass over every backend, then mark each slot READY or not."""
        await asyncio.gather(*(self._refresh_backend(b) for b in self.backends))
        for backend in self.backends:
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
        backend.last_error = ""

    @staticmethod
    async def _model_info(backend: Backend, name: str, version: str) -> ModelInfo:
        config = await backend.channel.control.ModelConfig(
            pb.ModelConfigRequest(name=name, version=version), timeout=_CONTROL_TIMEOUT_S
        )
        return ModelInfo.from_config(version, config)

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
                [s for s in slots if version in self.by_id[keys[s][0]].models.get(model, {})],
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

    def backend_of(self, slot: int) -> Backend:
        return self.by_id[self.state.slot_keys[slot][0]]

    def model_info(self, backend: Backend, model: str, version: str = "") -> ModelInfo:
        versions = backend.models[model]
        if version:
            return versions[version]
        return versions[max(versions, key=_version_key)]

    def _unroutable(self, model: str, version: str) -> NotFound | Unavailable:
        # "Unknown" needs every backend's word for it; an unreachable one might serve it.
        all_answered = all(b.reachable for b in self.backends)
        if all_answered and not any(model in b.known_models for b in self.backends):
            return NotFound(f"Request for unknown model: '{model}' is not found")
        label = f"'{model}' version {version}" if version else f"'{model}'"
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


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)
