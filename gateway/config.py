"""The gateway's configuration: one typed object built from a TOML file and flags."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import tomllib

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
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    backends: tuple[BackendSpec, ...] = field(default_factory=tuple)
    # How often the fleet's repository index and readiness are re-read.
    discovery_interval_s: float = 2.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Default per-request deadline, propagated to Triton as the gRPC deadline.
    request_timeout_s: float = 600.0
    log_level: str = "INFO"

    def with_overrides(self, **values: Any) -> GatewayConfig:
        """A copy with every non-None value replaced."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


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
    known = set(GatewayConfig.__dataclass_fields__) - {"backends"}
    unknown = set(gateway) - known
    if unknown:
        raise ConfigError(f"config {path}: unknown [gateway] keys {sorted(unknown)}")
    return GatewayConfig(backends=backends, **gateway)
