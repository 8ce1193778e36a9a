"""The aiohttp application: wires the fleet, the error handling and the API surfaces."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from .api import admin, kserve, openai
from .api.keys import CONFIG, FLEET, LIFECYCLE, ROUTER, Lifecycle
from .auth import TENANTS, Tenants, add_rate_headers, authenticate
from .config import GatewayConfig
from .errors import BadRequest, GatewayError, NotFound, PayloadTooLarge, StatusError
from .fleet import Fleet
from .loop_lag import watch_gc_pauses, watch_loop_lag
from .metrics import Metrics
from .router import Router
from .signals import SignalPlane
from .telemetry import TELEMETRY, Telemetry, echo_request_id, observe
from .tracing import tracing_from_config

log = logging.getLogger("meshgate.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSON body with the right status; no traceback leaks."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(request, _from_http_exception(exc))
    except web.RequestPayloadError as exc:
        # The body could not be read as sent, e.g. a Content-Encoding that does not decode.
        return error_response(request, BadRequest(f"unreadable request body: {exc}"))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(request, GatewayError("internal gateway error"))


@web.middleware
async def limit_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """431 when the headers together exceed max_header_bytes (aiohttp bounds each line)."""
    size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
    limit = request.app[CONFIG].max_header_bytes
    if size > limit:
        raise StatusError(f"request headers are {size} bytes, over the limit of {limit}", 431)
    return await handler(request)


# The fast lane serves only heads within max_header_bytes, which bounds the headers too.
limit_headers.covered_by_fast_lane = True  # type: ignore[attr-defined]


def error_response(request: web.Request, exc: GatewayError) -> web.Response:
    """The JSON error in the dialect of the surface that was called."""
    return exc.response_for(request.path)


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    # aiohttp raises these itself (no route, wrong method, body over client_max_size).
    if exc.status == 413:
        return PayloadTooLarge(exc.text or exc.reason)
    if exc.status == 404:
        return NotFound(f"no route for {exc.reason.lower()}")
    return StatusError(exc.reason, exc.status)


def create_app(config: GatewayConfig, fleet: Fleet | None = None) -> web.Application:
    """The app; ``fleet``: a worker's fleet that follows the signal process (see
    gateway/workers.py), else a new fleet that discovers and scrapes on its own."""
    tracing = tracing_from_config(config)
    # observe is outermost: it sees the status json_errors answered with.
    app = web.Application(
        middlewares=[observe, json_errors, limit_headers, authenticate],
        client_max_size=config.max_body_bytes,
    )
    app[CONFIG] = config
    app[TENANTS] = Tenants(config.tenants, config.probe_token)
    app.on_response_prepare.append(add_rate_headers)
    if fleet is None:
        fleet = Fleet(config)
    signals = SignalPlane(fleet, config)
    app[FLEET] = fleet
    router = Router(fleet, config)
    app[ROUTER] = router
    lifecycle = Lifecycle()
    app[LIFECYCLE] = lifecycle
    metrics = Metrics(fleet, router.outliers, router.scorer) if config.metrics else None
    app[TELEMETRY] = Telemetry(metrics, tracing)
    if metrics is not None:
        app.router.add_get("/metrics", metrics.handle)
    app.on_response_prepare.append(echo_request_id)
    kserve.add_routes(app)
    openai.add_routes(app)
    admin.add_routes(app)
    stop = asyncio.Event()
    background: list[asyncio.Task[None]] = []

    async def start_planes(app: web.Application) -> None:
        await fleet.start()
        await signals.start()
        background.append(asyncio.create_task(router.outliers.run(stop), name="health-checks"))
        if metrics is not None:
            lag = watch_loop_lag(metrics.observe_loop_lag, stop)
            background.append(asyncio.create_task(lag, name="loop-lag"))
            pauses = watch_gc_pauses(metrics.observe_gc_pause, stop)
            background.append(asyncio.create_task(pauses, name="gc-pauses"))

    async def close_planes(app: web.Application) -> None:
        stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        await signals.close()
        await fleet.close()
        await asyncio.to_thread(tracing.shutdown)  # flushes batched spans over the network

    async def start_draining(app: web.Application) -> None:
        # The listener is already closed; in-flight requests get drain_timeout_s.
        lifecycle.draining = True

    app.on_startup.append(start_planes)
    app.on_shutdown.append(start_draining)
    app.on_cleanup.append(close_planes)
    return app
