"""`meshgate serve | triton | up`: the gateway, a local Triton fleet, or both."""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
from pathlib import Path

from aiohttp import web

from adapters import gpu as gpu_adapter
from adapters.gpu import TOKEN_ENV as ADMIN_TOKEN_ENV

from . import local_triton, server
from .app import create_app
from .auth import hash_key_command
from .config import ConfigError, GatewayConfig, load_config, parse_backends
from .fleet import Fleet
from .logs import setup_logging
from .tracing import EXPORTERS
from .workers import default_workers, serve_workers


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    parser.add_argument(
        "--workers",
        type=_positive_int,
        help="processes serving the port with SO_REUSEPORT, with signals scraped once for"
        " all (default: one per core; 1: a single process)",
    )
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 8080)")
    parser.add_argument(
        "--discovery-interval",
        type=float,
        dest="discovery_interval_s",
        help="seconds between fleet discovery passes (default 2)",
    )
    parser.add_argument(
        "--dns-interval",
        type=float,
        dest="dns_interval_s",
        help="seconds between re-resolutions of dns+grpc:// backends (default 5)",
    )
    parser.add_argument("--max-body-bytes", type=int, help="largest request body (default 64 MiB)")
    parser.add_argument(
        "--request-timeout",
        type=float,
        dest="request_timeout_s",
        help="default per-request deadline in seconds",
    )
    parser.add_argument(
        "--stream-idle-timeout",
        type=float,
        dest="stream_idle_timeout_s",
        help="cut a stream whose upstream is silent this many seconds (default 30)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        dest="drain_timeout_s",
        help="on SIGTERM, seconds in-flight requests may take to finish (default 30)",
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument(
        "--fast-lane",
        action=argparse.BooleanOptionalAction,
        help="serve hot unary routes on the lean HTTP/1.1 front (default on)",
    )
    parser.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        help="Prometheus metrics at /metrics (default on)",
    )
    parser.add_argument("--trace-exporter", choices=EXPORTERS, help="where spans go (default none)")
    parser.add_argument(
        "--trace-endpoint", help="OTLP/HTTP traces URL (with --trace-exporter otlp)"
    )
    parser.add_argument(
        "--trace-sample-ratio",
        type=float,
        help="share of new traces recorded, 0..1 (default 1); a sampled traceparent is followed",
    )
    parser.add_argument("--policy", help="default routing policy (default hybrid)")
    parser.add_argument(
        "--scrape-interval",
        type=float,
        dest="scrape_interval_s",
        help="seconds between Triton metrics scrapes (default 0.25)",
    )
    parser.add_argument(
        "--admin-token",
        default=os.environ.get(ADMIN_TOKEN_ENV),
        help=f"bearer token of /admin and GPU sidecars (default ${ADMIN_TOKEN_ENV})",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _serve_config(args: argparse.Namespace, backend_urls: list[str]) -> GatewayConfig:
    config = load_config(args.config)
    # Backends on the command line replace the config file's, fixed and DNS alike.
    backends, dns_backends = parse_backends(backend_urls) if backend_urls else (None, None)
    return config.with_overrides(
        host=args.host,
        port=args.port,
        backends=backends,
        dns_backends=dns_backends,
        discovery_interval_s=args.discovery_interval_s,
        dns_interval_s=args.dns_interval_s,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout_s,
        stream_idle_timeout_s=args.stream_idle_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
        log_level=args.log_level,
        metrics=args.metrics,
        fast_lane=args.fast_lane,
        trace_exporter=args.trace_exporter,
        trace_endpoint=args.trace_endpoint,
        trace_sample_ratio=args.trace_sample_ratio,
        policy=args.policy,
        scrape_interval_s=args.scrape_interval_s,
        admin_token=args.admin_token,
    )


def _check_backends(config: GatewayConfig) -> None:
    if not config.backends and not config.dns_backends:
        raise ConfigError(
            "no backends: pass --backend grpc://HOST:PORT (or dns+grpc://NAME:PORT)"
            " or list them in --config"
        )


def serve_gateway(config: GatewayConfig, workers: int) -> int:
    """The gateway in this process (``workers`` = 1), or as ``workers`` processes sharing
    the port (gateway/workers.py); returns the exit code."""
    _check_backends(config)
    if workers == 1:
        run_gateway(config)
        return 0
    return serve_workers(config, workers)


def run_gateway(
    config: GatewayConfig, fleet: Fleet | None = None, reuse_port: bool = False
) -> None:
    """Serve until SIGINT/SIGTERM on a uvloop event loop. A worker passes its fleet
    (following the signal process) and binds with SO_REUSEPORT beside the others."""
    app = create_app(config, fleet)  # a bad telemetry setting fails here, before logging starts
    log_writer = setup_logging(config.log_level)
    try:
        _run_app(app, config, reuse_port)
    finally:
        log_writer.stop()  # writes what is still pending


def _ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The HTTPS listener's context from tls_cert/tls_key, or None for plain HTTP."""
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError("tls_cert and tls_key must be set together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert/tls_key: {exc}") from exc
    return context


def _run_app(app: web.Application, config: GatewayConfig, reuse_port: bool) -> None:
    ssl_context = _ssl_context(config)

    def on_listening() -> None:
        logging.getLogger("meshgate").info(
            "gateway listening on %s://%s:%d with %d backends and %d DNS names",
            "https" if ssl_context else "http",
            config.host,
            config.port,
            len(config.backends),
            len(config.dns_backends),
        )

    server.serve(app, config, ssl_context, reuse_port=reuse_port, on_listening=on_listening)


def _cmd_serve(args: argparse.Namespace) -> int:
    return serve_gateway(_serve_config(args, args.backend), args.workers or default_workers())


def _cmd_up(args: argparse.Namespace) -> int:
    fleet = local_triton.TritonFleet(
        count=args.triton_count,
        port_base=args.triton_port_base,
        model_repository=args.model_repository,
        log_dir=args.log_dir,
    )
    try:
        fleet.start()
    except local_triton.TritonLaunchError as exc:
        print(f"meshgate up: error: {exc}", file=sys.stderr)
        return 2
    try:
        urls = [s.backend_url for s in fleet.servers]
        config = _serve_config(args, urls)
        for server in fleet.servers:
            print(
                f"triton: grpc {server.grpc_url} metrics {server.metrics_url} log {server.log_path}"
            )
        print(
            f"try:\n  curl -N http://{config.host}:{config.port}/v2/models/tiny_lm/generate_stream "
            '-d \'{"text_input": "We hold these truths", "max_tokens": 20, "stream": true}\'',
            flush=True,
        )
        return serve_gateway(config, args.workers or default_workers())
    finally:
        fleet.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway in front of Triton servers")
    serve.add_argument(
        "--backend",
        action="append",
        default=[],
        help="grpc://HOST:PORT[?metrics=URL][&http=HOST:PORT][&id=NAME], or"
        " dns+grpc://NAME:PORT[?metrics_port=P][&http_port=P] (one backend per address);"
        " repeatable",
    )
    _add_serve_arguments(serve)
    serve.set_defaults(run=_cmd_serve)

    triton = commands.add_parser("triton", help="start N local tritonserver processes")
    local_triton.add_arguments(triton)
    triton.set_defaults(run=local_triton.main)

    up = commands.add_parser("up", help="start a local Triton fleet and the gateway in front of it")
    up.add_argument("--triton-count", type=int, default=2)
    up.add_argument("--triton-port-base", type=int, default=18000)
    up.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    up.add_argument("--log-dir", type=Path, default=Path(".run/triton"))
    _add_serve_arguments(up)
    up.set_defaults(run=_cmd_up)

    key = commands.add_parser("key", help="API key helpers")
    key_commands = key.add_subparsers(dest="key", required=True)
    key_hash = key_commands.add_parser(
        "hash", help="read an API key on stdin, print its key_sha256 for [tenants.NAME]"
    )
    key_hash.set_defaults(run=hash_key_command)

    adapter = commands.add_parser("adapter", help="run a signal adapter as a sidecar")
    adapters = adapter.add_subparsers(dest="adapter", required=True)
    gpu = adapters.add_parser("gpu", help="push NVML GPU readings to a gateway's /admin/deltas")
    gpu_adapter.add_arguments(gpu)
    gpu.set_defaults(run=gpu_adapter.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"meshgate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
