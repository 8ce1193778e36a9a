"""The gateway's configuration: one typed object built from a TOML file and flags."""

from __future__ import annotations

import ssl
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from fastpath.admission import AdmissionConfig
from fastpath.scoring import ScoringConfig
from fastpath.state import POLICY_NAMES
from fastpath.tenants import TenantLimits

if TYPE_CHECKING:
    from .discovery import Resolver

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending value."""


@dataclass(frozen=True)
class GrpcTls:
    """TLS to one backend's gRPC endpoint, as ``grpc.ssl_channel_credentials`` takes it.

    The PEM bytes are read once, when the backend URL is parsed. No root certificates:
    the system's; a certificate chain and its key: mutual TLS. Key material stays out
    of ``repr``."""

    root_certificates: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    # The name the server's certificate must carry, in place of the target's host.
    server_name: str | None = None


_BACKEND_PARAMETERS = frozenset({"metrics", "http", "id"})
_TLS_PARAMETERS = frozenset({"ca", "cert", "key", "server_name"})


@dataclass(frozen=True)
class BackendSpec:
    """One Triton server: where its gRPC endpoint and (optionally) its metrics live."""

    id: str
    grpc_target: str
    metrics_url: str | None = None
    # Triton's HTTP endpoint ("HOST:PORT"): unary infer is forwarded there as-is,
    # which costs far less per request than a grpc.aio call (bench/README.md).
    # Always plain HTTP, also for a grpcs:// backend.
    http_target: str | None = None
    # None: a plaintext gRPC channel (grpc://).
    tls: GrpcTls | None = None

    @classmethod
    def parse(cls, url: str, default_id: str, base: Path | None = None) -> BackendSpec:
        """Parse ``grpc://HOST:PORT[?metrics=URL][&http=HOST:PORT][&id=NAME]``, or
        ``grpcs://`` with also ``[&ca=PEM][&cert=PEM&key=PEM][&server_name=NAME]``.

        The PEM files are read here, relative to ``base`` (None: the working
        directory); one that cannot be read or used is a ConfigError naming it."""
        parts = urlsplit(url if "://" in url else f"grpc://{url}")
        if parts.scheme not in ("grpc", "grpcs"):
            raise ConfigError(
                f"backend {url!r}: expected scheme grpc:// or grpcs://, got {parts.scheme}://"
            )
        if not parts.hostname or parts.port is None:
            raise ConfigError(f"backend {url!r}: expected {parts.scheme}://HOST:PORT")
        # Blank values kept so that grpcs:// can refuse an empty ca= or cert=.
        query = parse_qs(parts.query, keep_blank_values=True)
        tls = None
        if parts.scheme == "grpcs":
            tls = _grpc_tls(url, query, base)
        elif misplaced := sorted(set(query) & _TLS_PARAMETERS):
            raise ConfigError(f"backend {url!r}: {misplaced} need the grpcs:// scheme")
        backend_id = query.get("id", [default_id])[0] or default_id
        return cls(
            id=backend_id,
            grpc_target=f"{parts.hostname}:{parts.port}",
            metrics_url=query.get("metrics", [None])[0] or None,
            http_target=query.get("http", [None])[0] or None,
            tls=tls,
        )


def _grpc_tls(url: str, query: dict[str, list[str]], base: Path | None) -> GrpcTls:
    unknown = set(query) - _BACKEND_PARAMETERS - _TLS_PARAMETERS
    if unknown:
        raise ConfigError(f"backend {url!r}: unknown parameters {sorted(unknown)}")
    values = {name: query[name][0] for name in _TLS_PARAMETERS if name in query}
    if empty := sorted(name for name, value in values.items() if not value):
        raise ConfigError(f"backend {url!r}: {empty} must not be empty")
    if ("cert" in values) != ("key" in values):
        raise ConfigError(f"backend {url!r}: cert and key go together (mutual TLS) or not at all")
    files = [name for name in ("ca", "cert", "key") if name in values]
    paths = {name: (base or Path()) / values[name] for name in files}
    pem = {name: _read_pem(url, name, path) for name, path in paths.items()}
    # grpc would only fail at the first handshake, and say less: check what ssl can now.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if "ca" in pem:
        try:
            context.load_verify_locations(cadata=pem["ca"].decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise ConfigError(f"backend {url!r}: ca file {paths['ca']}: {exc}") from exc
    if "cert" in pem:
        try:
            context.load_cert_chain(paths["cert"], paths["key"], password=_no_password)
        except _EncryptedKey:
            raise ConfigError(
                f"backend {url!r}: key file {paths['key']} is encrypted; grpc needs a plain key"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"backend {url!r}: cert file {paths['cert']} with key file {paths['key']}: {exc}"
            ) from exc
    return GrpcTls(
        root_certificates=pem.get("ca"),
        certificate_chain=pem.get("cert"),
        private_key=pem.get("key"),
        server_name=values.get("server_name"),
    )


def _read_pem(url: str, name: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"backend {url!r}: {name} file {path}: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise ConfigError(f"backend {url!r}: {name} file {path} is not PEM")
    return data


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Called by ssl only for an encrypted key; without it OpenSSL would prompt on a tty.
    raise _EncryptedKey


DNS_SCHEME = "dns+grpc"


@dataclass(frozen=True)
class DnsBackendSpec:
    """A DNS name whose every address is one Triton server (a Kubernetes headless
    Service), re-resolved every ``dns_interval_s`` by ``gateway/discovery.py``."""

    name: str
    port: int  # gRPC
    metrics_port: int | None = None
    http_port: int | None = None

    @classmethod
    def parse(cls, url: str) -> DnsBackendSpec:
        """Parse ``dns+grpc://NAME:PORT[?metrics_port=PORT][&http_port=PORT]``."""
        parts = urlsplit(url)
        if parts.scheme != DNS_SCHEME or not parts.hostname or parts.port is None:
            raise ConfigError(f"backend {url!r}: expected {DNS_SCHEME}://NAME:PORT")
        query = parse_qs(parts.query)
        unknown = set(query) - {"metrics_port", "http_port"}
        if unknown:
            raise ConfigError(f"backend {url!r}: unknown parameters {sorted(unknown)}")
        return cls(
            parts.hostname,
            parts.port,
            metrics_port=_port_parameter(url, query, "metrics_port"),
            http_port=_port_parameter(url, query, "http_port"),
        )

    def backend(self, address: str, port: int) -> BackendSpec:
        """The backend at one resolved (address, gRPC port).

        Its id is ``NAME@ADDRESS``, or ``NAME@ADDRESS:PORT`` when the resolver answered
        another port than the name's (SRV-style), which keeps ids unique. Metrics and
        HTTP ports keep the name's distance from the gRPC port."""
        host = f"[{address}]" if ":" in address else address  # IPv6 in a target
        backend_id = f"{self.name}@{address}" if port == self.port else f"{self.name}@{host}:{port}"
        shift = port - self.port
        return BackendSpec(
            id=backend_id,
            grpc_target=f"{host}:{port}",
            metrics_url=(
                f"http://{host}:{self.metrics_port + shift}/metrics"
                if self.metrics_port is not None
                else None
            ),
            http_target=f"{host}:{self.http_port + shift}" if self.http_port is not None else None,
        )


def _port_parameter(url: str, query: dict[str, list[str]], key: str) -> int | None:
    value = query.get(key, [None])[0]
    if value is None:
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError(f"backend {url!r}: {key} must be a port number, got {value!r}")
    return int(value)


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
    # Names whose addresses are backends, re-resolved every dns_interval_s (dns+grpc://).
    dns_backends: tuple[DnsBackendSpec, ...] = field(default_factory=tuple)
    dns_interval_s: float = 5.0
    # How dns_backends are resolved; None: the system resolver. Set by code (tests), not files.
    resolver: Resolver | None = None
    # How often the fleet's repository index and readiness are re-read.
    discovery_interval_s: float = 2.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Default per-request deadline, propagated to Triton as the gRPC deadline.
    request_timeout_s: float = 600.0
    # A stream whose upstream sends nothing for this long (after its first response)
    # is cut with an explicit error.
    stream_idle_timeout_s: float = 30.0
    # A client connection with no request in flight is closed once the client has sent
    # nothing for this long: an idle keep-alive, or a request that stopped arriving.
    client_idle_timeout_s: float = 75.0
    # On SIGTERM: stop accepting, then let in-flight requests finish for this long.
    drain_timeout_s: float = 30.0
    # Failover retries in flight stay within this share of the requests in flight,
    # and never below retry_budget_min (Envoy's retry budget, same defaults).
    retry_budget_fraction: float = 0.2
    retry_budget_min: int = 3
    log_level: str = "INFO"
    # Prometheus metrics at GET /metrics; off skips their per-request updates too.
    metrics: bool = True
    # Where spans go: "none" (no tracing; an incoming traceparent still reaches Triton),
    # "console" (stdout) or "otlp" (OTLP/HTTP to trace_endpoint).
    trace_exporter: str = "none"
    # OTLP/HTTP traces URL; None: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or localhost:4318.
    trace_endpoint: str | None = None
    # Share of new traces recorded; a caller's sampled traceparent is always followed.
    trace_sample_ratio: float = 1.0
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
    # API keys and limits by tenant; none configured: the data routes need no key.
    tenants: tuple[TenantSpec, ...] = field(default_factory=tuple)
    # Bearer token of /v2/health/* and /metrics; None: they stay open (for probes).
    probe_token: str | None = None
    # Request limits; 0 means unlimited (see README "Tenants, keys and limits").
    max_header_bytes: int = 16384  # request line and headers together: 431 above
    max_tokens_limit: int = 0  # largest max_tokens a request may ask for: 400 above
    max_inputs: int = 0  # tensors in one infer request: 400 above
    max_tensor_elements: int = 0  # elements of one input tensor: 400 above
    # Serve the hot unary routes on the lean HTTP/1.1 front (gateway.fastlane); off:
    # aiohttp serves every request (same answers, more CPU per request).
    fast_lane: bool = True
    # HTTPS listener: PEM certificate chain and private key; None: plain HTTP.
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def model_settings(self, model: str) -> ModelSettings:
        return self.models.get(model, _DEFAULT_MODEL_SETTINGS)

    def with_overrides(self, **values: Any) -> GatewayConfig:
        """A copy with every non-None value replaced."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class TenantSpec:
    """One tenant from a ``[tenants.NAME]`` table: its API keys and limits."""

    name: str
    # SHA-256 hex digests of the tenant's keys (``meshgate key hash``): no key is stored.
    key_sha256: tuple[str, ...]
    limits: TenantLimits


_DEFAULT_MODEL_SETTINGS = ModelSettings()


def parse_backends(
    urls: list[str], base: Path | None = None
) -> tuple[tuple[BackendSpec, ...], tuple[DnsBackendSpec, ...]]:
    """The fixed backends (``grpc://``, ``grpcs://``) and the DNS names (``dns+grpc://``)
    of ``urls``; relative TLS file paths are relative to ``base`` (None: the working
    directory)."""
    dns = tuple(DnsBackendSpec.parse(u) for u in urls if u.startswith(f"{DNS_SCHEME}://"))
    fixed = [u for u in urls if not u.startswith(f"{DNS_SCHEME}://")]
    specs = tuple(BackendSpec.parse(url, f"b{i}", base) for i, url in enumerate(fixed))
    ids = [s.id for s in specs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"backend ids must be unique, got {ids}")
    return specs, dns


def load_config(path: Path | None) -> GatewayConfig:
    """Read a TOML config file (see README); no file gives the defaults."""
    if path is None:
        return GatewayConfig()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config {path}: {exc}") from exc
    gateway = dict(data.get("gateway", {}))
    backends, dns_backends = parse_backends(
        [b if isinstance(b, str) else b["url"] for b in data.get("backends", [])],
        base=path.parent,  # grpcs:// file paths are relative to the config file
    )
    not_keys = {"backends", "dns_backends", "resolver", "models", "scoring", "admission", "outlier"}
    not_keys |= {"tenants"}
    known = set(GatewayConfig.__dataclass_fields__) - not_keys
    unknown = set(gateway) - known
    if unknown:
        raise ConfigError(f"config {path}: unknown [gateway] keys {sorted(unknown)}")
    for name in ("tls_cert", "tls_key"):
        if name in gateway:
            gateway[name] = path.parent / gateway[name]  # relative to the config file
    tenants = tuple(
        _tenant_spec(path, name, table) for name, table in data.get("tenants", {}).items()
    )
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
        dns_backends=dns_backends,
        models=models,
        tenants=tenants,
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


_TENANT_LIMITS = frozenset(TenantLimits.__dataclass_fields__)


def _tenant_spec(path: Path, name: str, table: dict[str, Any]) -> TenantSpec:
    where = f"config {path}: [tenants.{name}]"
    unknown = set(table) - _TENANT_LIMITS - {"key_sha256"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    keys = table.get("key_sha256")
    digests = (keys,) if isinstance(keys, str) else keys
    if not isinstance(digests, list | tuple) or not digests:
        raise ConfigError(f"{where}: key_sha256 must be a hex digest or a list of them")
    for digest in digests:
        if not (isinstance(digest, str) and len(digest) == 64 and _is_hex(digest)):
            # Never echo the value: it might be a key pasted in place of its hash.
            raise ConfigError(f"{where}: key_sha256 entries must be 64 hex digits")
    try:
        limits = TenantLimits(**{k: v for k, v in table.items() if k in _TENANT_LIMITS})
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return TenantSpec(name, tuple(d.lower() for d in digests), limits)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True
