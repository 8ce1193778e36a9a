"""The fleet: which Triton backend serves which model, kept current in the background.

Discovery reads each backend's repository index every ``discovery_interval_s``;
a model is routed only to backends where it is READY. The data plane reads
``Fleet.route`` and never waits on discovery.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from .config import BackendSpec, GatewayConfig
from .errors import NotFound, Unavailable
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
        self._interval = config.discovery_interval_s
        self._routes: dict[str, list[Backend]] = {}
        self._rr: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open a channel per backend (inside the running loop, as grpc.aio needs),
        discover the fleet once, then keep discovering in the background."""
        self.backends = [
            Backend(spec, TritonChannel(spec.grpc_target, self._max_message_bytes))
            for spec in self._specs
        ]
        await self.refresh()
        self._task = asyncio.create_task(self._discover_forever(), name="fleet-discovery")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(b.channel.close() for b in self.backends))

    async def refresh(self) -> None:
        """One discovery pass over every backend, then rebuild the routing index."""
        await asyncio.gather(*(self._refresh_backend(b) for b in self.backends))
        routes: dict[str, list[Backend]] = {}
        for backend in self.backends:
            if backend.ready:
                for name in backend.models:
                    routes.setdefault(name, []).append(backend)
        self._routes = routes

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

    def route(self, model: str, version: str = "") -> list[Backend]:
        """Backends that can serve ``model`` now, first choice first (round-robin).

        Raises NotFound for a model no backend knows and Unavailable when it is known
        but READY nowhere.
        """
        candidates = self._routes.get(model, [])
        if version:
            candidates = [b for b in candidates if version in b.models[model]]
        if not candidates:
            raise self._unroutable(model, version)
        turn = self._rr.get(model, 0)
        self._rr[model] = turn + 1
        start = turn % len(candidates)
        return candidates[start:] + candidates[:start]

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

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "id": b.id,
                "target": b.spec.grpc_target,
                "reachable": b.reachable,
                "ready": b.ready,
                "models": sorted(b.models),
                "last_error": b.last_error,
            }
            for b in self.backends
        ]


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)
