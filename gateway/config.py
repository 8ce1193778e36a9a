"""The gateway's configuration: one typed object built from a TOML file and flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastpath.admission import AdmissionConfig
from fastpath.scoring import ScoringConfig
from fastpath.state import POLICY_NAMES

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending value."""


@dataclass(frozen=True)
class BackendSpec:
    """One Triton server: where its gRPC endpoint and (optionally) its metrics live."""

    id: str
    grpc_target: str
    metrics_url: str | None = None

    @classmethod
    def parse(cls, url: str, default_id: str) -> BackendSpec:
        """Parse ``grpc://HOST:PORT[?metrics=URL][&id=NAME]``."""
        parts = urlsplit(url if "://" in url else f"grpc://{url}")
        if parts.scheme != "grpc":
            raise ConfigError(f"backend {url!r}: expected scheme grpc://, got {parts.scheme}://")
        if not parts.hostname or parts.port is None:
            raise ConfigError(f"backend {url!r}: expected grpc://HOST:PORT")
        query = parse_qs(parts.query)
        metrics = query.get("metrics", [None])[0]
        backend_id = query.get("id", [default_id])[0] or default_id
        return cls(id=backend_id, grpc_target=f"{parts.hostname}:{parts.port}", metrics_url=metrics)


@dataclass(frozen=True)
class OutlierConfig:
    """Outlier ejection (see gateway/outliers.py); the ``[outlier]`` table."""

    consecutive_failures: int = 5  # failures in a row that eject a backend
    base_ejection_s: float = 30.0  # first ejection; the n-th lasts n times this
    max_ejection_s: float = 300.0  # cap of one ejection
    max_ejected_fraction: float = 0.5  # never eject more than this share of the fleet
    health_check_interval_s: float = 1.0  # ServerReady probes of ejected backends
    reentry_weight: float = 0.25  # traffic share right after return; doubles per interval


@dataclass(frozen=True)
class ModelSettings:
    """Per-model options from the config file's ``[models.NAME]`` tables."""

    # How OpenAI requests become Triton tensors: "triton-llm", "vllm", or None to detect.
    profile: str | None = None
    # A Jinja chat template file (Hugging Face ``chat_template`` style); None: the default.
    chat_template: Path | None = None
    # Routing policy name; None: the gateway's default policy.
    policy: str | None = None


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    backends: tuple[BackendSpec, ...] = field(default_factory=tuple)
    # How often the fleet's repository index and readiness are re-read.
    discovery_interval_s: float = 2.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Default per-request deadline, propagated to Triton as the gRPC deadline.
    request_timeout_s: float = 600.0
    # A stream whose upstream sends nothing for this long (after its first response)
    # is cut with an explicit error.
    stream_idle_timeout_s: float = 30.0
    # On SIGTERM: stop accepting, then let in-flight requests finish for this long.
    drain_timeout_s: float = 30.0
    log_level: str = "INFO"
    # Routing policy of models without their own: round_robin, least_queue,
    # power_of_two, hybrid, prefix_affinity.
    policy: str = "hybrid"
    # Seconds between scrapes of each backend's Triton metrics endpoint.
    scrape_interval_s: float = 0.25
    # Bearer token of /admin/* and of GPU sidecars pushing deltas; None: admin API off.
    admin_token: str | None = None
    # Rows of the fleet state array: (backend, model) deployments the gateway can track.
    max_slots: int = 1024
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    models: dict[str, ModelSettings] = field(default_factory=dict)

    def model_settings(self, model: str) -> ModelSettings:
        return self.models.get(model, _DEFAULT_MODEL_SETTINGS)

    def with_overrides(self, **values: Any) -> GatewayConfig:
        """A copy with every non-None value replaced."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


_DEFAULT_MODEL_SETTINGS = ModelSettings()


def parse_backends(urls: list[str]) -> tuple[BackendSpec, ...]:
    specs = tuple(BackendSpec.parse(url, f"b{i}") for i, url in enumerate(urls))
    ids = [s.id for s in specs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"backend ids must be unique, got {ids}")
    return specs


def load_config(path: Path | None) -> GatewayConfig:
    """Read a TOML config file (see README); no file gives the defaults."""
    if path is None:
        return GatewayConfig()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config {path}: {exc}") from exc
    gateway = dict(data.get("gateway", {}))
    backends = parse_backends(
        [b if isinstance(b, str) else b["url"] for b in data.get("backends", [])]
    )
    tables = {"backends", "models", "scoring", "admission", "outlier"}
    known = set(GatewayConfig.__dataclass_fields__) - tables
    unknown = set(gateway) - known
    if unknown:
        raise ConfigError(f"config {path}: unknown [gateway] keys {sorted(unknown)}")
    models = {
        name: _model_settings(path, name, table) for name, table in data.get("models", {}).items()
    }
    try:
        scoring = ScoringConfig(**data.get("scoring", {}))
        admission = AdmissionConfig(**data.get("admission", {}))
        outlier = OutlierConfig(**data.get("outlier", {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config {path}: {exc}") from exc
    return GatewayConfig(
        backends=backends,
        models=models,
        scoring=scoring,
        admission=admission,
        outlier=outlier,
        **gateway,
    )


def check_policy(name: str, where: str) -> int:
    """The policy id of ``name``, or a ConfigError naming the choices."""
    policy = POLICY_NAMES.get(name)
    if policy is None:
        raise ConfigError(f"{where}: unknown policy {name!r}; choose from {sorted(POLICY_NAMES)}")
    return policy


def _model_settings(path: Path, name: str, table: dict[str, Any]) -> ModelSettings:
    unknown = set(table) - set(ModelSettings.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"config {path}: unknown [models.{name}] keys {sorted(unknown)}")
    template = table.get("chat_template")
    return ModelSettings(
        profile=table.get("profile"),
        # Relative template paths are relative to the config file.
        chat_template=(path.parent / template) if template else None,
        policy=table.get("policy"),
    )
