"""The aiohttp application: wires the fleet, the error handling and the API surfaces."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from .api import kserve
from .api.keys import CONFIG, FLEET
from .config import GatewayConfig
from .errors import GatewayError
from .fleet import Fleet

log = logging.getLogger("meshgate.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(status: int, message: str, error_type: str) -> web.Response:
    return web.json_response({"error": message, "type": error_type}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSON body with the right status; no traceback leaks."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return web.Response(
            status=exc.status,
            body=exc.body(),
            content_type="application/json",
            headers=exc.headers(),
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(
            exc.status, exc.reason, _HTTP_ERROR_TYPES.get(exc.status, "http_error")
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(500, "internal gateway error", "internal_error")


_HTTP_ERROR_TYPES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    400: "invalid_request",
}


def create_app(config: GatewayConfig) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[FLEET] = Fleet(config)
    kserve.add_routes(app)

    async def start_fleet(app: web.Application) -> None:
        await app[FLEET].start()

    async def close_fleet(app: web.Application) -> None:
        await app[FLEET].close()

    app.on_startup.append(start_fleet)
    app.on_cleanup.append(close_fleet)
    return app
