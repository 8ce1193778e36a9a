"""Serving the app: aiohttp's runner and sites, with the fast lane in front.

Each accepted connection starts on ``fastlane.FrontConnection``; aiohttp's own
``web.Server`` is what a connection is handed to when the fast lane does not serve it,
and what drains alongside the fast lane on shutdown.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import ssl
from collections.abc import Callable
from contextlib import suppress
from typing import Any, cast

import uvloop
from aiohttp import web
from aiohttp.web_runner import GracefulExit

from .config import GatewayConfig
from .fastlane import FastLane

log = logging.getLogger("meshgate")
# The soft limit on open files is raised to at most this when the hard limit is
# unlimited (Linux's default fs.nr_open; above it setrlimit fails).
_MAX_OPEN_FILES = 1 << 20


class _FrontServer:
    """The protocol factory a site listens with: a front connection per client, with
    aiohttp's server behind it (``web.Server``'s shutdown protocol, both drained)."""

    def __init__(self, inner: web.Server, app: web.Application) -> None:
        self.inner = inner
        self.lane = FastLane(app, inner)

    def __call__(self) -> asyncio.Protocol:
        return self.lane()

    def pre_shutdown(self) -> None:
        self.inner.pre_shutdown()
        self.lane.close_idle()

    async def shutdown(self, timeout: float | None = None) -> None:
        await asyncio.gather(self.inner.shutdown(timeout), self.lane.drain(timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # the rest of web.Server, for the runner


class FrontRunner(web.AppRunner):
    """An AppRunner whose sites accept connections on the fast lane."""

    async def _make_server(self) -> web.Server:
        inner = await super()._make_server()
        return cast(web.Server, _FrontServer(inner, self.app))


def serve(
    app: web.Application,
    config: GatewayConfig,
    ssl_context: ssl.SSLContext | None,
    *,
    reuse_port: bool = False,
    on_listening: Callable[[], None] = lambda: None,
) -> None:
    """Serve ``app`` on ``config.host:config.port`` until SIGINT/SIGTERM, then drain
    (in-flight requests get ``drain_timeout_s``), on a uvloop event loop."""
    raise_open_files_limit()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, config, ssl_context, reuse_port, on_listening))
    try:
        loop.run_until_complete(main)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not main.done():
            main.cancel()
            with suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, as nginx's
    ``worker_rlimit_nofile`` and Go's runtime do: every stream holds two (the client's
    connection and Triton's), and a soft limit of 1,024, common outside containers,
    refused clients from ~500 streams on. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("open files: the soft limit stays %d (%s)", soft, exc)
        return soft
    log.info("open files: soft limit raised from %d to %d", soft, target)
    return target


async def _serve(
    app: web.Application,
    config: GatewayConfig,
    ssl_context: ssl.SSLContext | None,
    reuse_port: bool,
    on_listening: Callable[[], None],
) -> None:
    runner_class = FrontRunner if config.fast_lane else web.AppRunner
    runner = runner_class(
        app,
        handle_signals=True,
        # A client that hangs up cancels its handler, and with it the upstream call.
        handler_cancellation=True,
        shutdown_timeout=config.drain_timeout_s,
        # aiohttp's idle keep-alive like the fast lane's (it has no timeout on a request
        # that stops arriving part-way: the fast lane's sweep covers those it holds).
        keepalive_timeout=config.client_idle_timeout_s,
        access_log=None,
        # aiohttp's parser bounds each header line; limit_headers bounds them together.
        max_line_size=config.max_header_bytes,
        max_field_size=config.max_header_bytes,
    )
    await runner.setup()
    try:
        site = web.TCPSite(
            runner, config.host, config.port, ssl_context=ssl_context, reuse_port=reuse_port
        )
        await site.start()
        # Everything made so far (modules, the app, its clients) lives as long as the
        # process: out of the garbage collector's sight, a full collection walks only
        # the objects of requests. Measured (bench/README.md, "1,000 concurrent
        # streams"): a full collection took ~50 ms with no request in flight, and held
        # the loop 83 ms at 1,000 streams against 60 ms with this.
        gc.freeze()
        on_listening()
        await asyncio.Event().wait()  # until a signal ends the loop
    finally:
        await runner.cleanup()
