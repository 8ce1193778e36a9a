"""A lean HTTP/1.1 front for the hot routes; aiohttp serves everything else.

Why: measured here, aiohttp's server machinery alone costs ~200 CPU-µs per request
before a handler runs (ARCHITECTURE.md, "Calibration"), twice nginx's whole proxy.
This front parses a request head with a few bytes operations and runs the *same*
middlewares and handler aiohttp would run, on a ``FrontRequest`` that offers the part
of aiohttp's ``Request`` they use (headers, path, app, per-request keys, ``read``).

Which requests: only unambiguous ones on the routes in ``HOT_ROUTES`` (answered with a
``web.Response``, or streamed through ``FrontRequest.start_stream``, see gateway/sse.py):
HTTP/1.1, a head within ``max_header_bytes``, a plain ``Content-Length`` body within
``max_body_bytes`` (no Transfer-Encoding, Expect, Upgrade or Content-Encoding), a path
without percent-escapes or dot segments. A head over ``max_header_bytes`` is refused
here, whatever its route (414 or 431, see ``FrontConnection._refuse_head``). Any other
request hands its connection, with the bytes read so far, to aiohttp's own protocol for
the rest of the connection's life, so everything else (admin, metadata, errors about
malformed requests) behaves exactly as aiohttp serves it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute
from multidict import CIMultiDict

from fastpath.http1 import parse_request_head

from .api.keys import CONFIG
from .errors import StatusError
from .http1 import receive_in_place
from .pacing import StartPacer

log = logging.getLogger("meshgate.fastlane")

# (method, route) pairs served here; each must be registered on the app (checked at start).
HOT_ROUTES = (
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{model}/ready"),
    ("GET", "/v2/models/{model}/versions/{version}/ready"),
    ("POST", "/v2/models/{model}/infer"),
    ("POST", "/v2/models/{model}/versions/{version}/infer"),
    ("POST", "/v2/models/{model}/generate"),
    ("POST", "/v2/models/{model}/versions/{version}/generate"),
    ("POST", "/v2/models/{model}/generate_stream"),
    ("POST", "/v2/models/{model}/versions/{version}/generate_stream"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
)
# What a connection buffers of the client's next requests while one is in flight; past
# it, reading pauses until that one is answered (else a client that keeps sending grows
# the buffer without bound). A hang-up is then seen at the next write, not at once.
PIPELINED_BYTES = 256 * 1024
# After refusing an over-long head, what the client still sends is read and dropped for
# at most this long before the connection closes (nginx's lingering_timeout).
LINGER_S = 5.0
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
# Distinct (method, path) pairs whose route match is remembered (cleared when full).
_MATCH_CACHE_SIZE = 4096
# Response headers the front writes itself, from what it sends.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class MatchInfo(dict[str, str]):
    """The route's variables, and the aiohttp route (its name is the span's name)."""

    __slots__ = ("route",)

    def __init__(self, route: AbstractRoute, values: dict[str, str]) -> None:
        super().__init__(values)
        self.route = route


class FrontRequest:
    """The part of aiohttp's ``web.Request`` the middlewares and hot handlers use."""

    __slots__ = (
        "_body",
        "_keys",
        "app",
        "headers",
        "match_info",
        "method",
        "path",
        "raw_headers",
        "raw_path",
        "stream",
        "transport",
    )

    def __init__(
        self,
        app: web.Application,
        method: str,
        raw_path: str,
        raw_headers: list[tuple[bytes, bytes]],
        headers: list[tuple[str, str]],
        match_info: MatchInfo,
        body: bytes | bytearray | memoryview,
        transport: asyncio.Transport,
    ) -> None:
        self.app = app
        self.transport = transport
        self.stream: FrontStreamResponse | None = None  # set once a streamed answer began
        self.method = method
        self.raw_path = raw_path
        self.path = raw_path.partition("?")[0]
        self.raw_headers = raw_headers
        self.headers = CIMultiDict(headers)
        self.match_info = match_info
        self._body = body
        self._keys: dict[Any, Any] = {}

    def __getitem__(self, key: Any) -> Any:
        return self._keys[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._keys[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        return self._keys.get(key, default)

    async def read(self) -> bytes:
        # A buffer, not always bytes: every reader of a body here takes any buffer.
        return cast(bytes, self._body)

    async def prepare_stream(self, headers: dict[str, str]) -> FrontStreamResponse:
        """A streamed (chunked) 200 answer, its head final but not sent: nothing is
        committed until ``start_stream``, so it can be made ahead of need."""
        response = FrontStreamResponse(self.transport, headers)
        await self.app.on_response_prepare.send(cast(web.Request, self), response)
        response.render_head()
        return response

    def start_stream(self, response: FrontStreamResponse) -> None:
        """Send the prepared answer's head; its chunks follow on the connection."""
        response.send_head()
        self.stream = response


class FrontStreamResponse(web.StreamResponse):
    """A streamed answer on a front connection: one chunk per ``write``, each written to
    the transport at once (what aiohttp's writer does with more bookkeeping)."""

    def __init__(self, transport: asyncio.Transport, headers: dict[str, str]) -> None:
        super().__init__(status=200, headers=headers)
        self._transport = transport
        self._head = b""
        self._ended = False

    def render_head(self) -> None:
        self._head = _head(self, b"Transfer-Encoding: chunked\r\n")

    def send_head(self) -> None:
        self._transport.write(self._head)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.write_chunk(data)

    def write_chunk(self, data: bytes | bytearray | memoryview) -> None:
        """``write`` without the await, for callbacks (gateway/http_stream.py relay)."""
        if data:
            self._transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))

    async def write_eof(self, data: bytes | bytearray | memoryview = b"") -> None:
        """The last chunk; once only (a handler may end its stream itself, or return it
        for the connection to end, as aiohttp does)."""
        if self._ended:
            return
        self._ended = True
        await self.write(data)
        self._transport.write(b"0\r\n\r\n")


class _Route:
    __slots__ = ("aiohttp_route", "handler", "segments")

    def __init__(self, aiohttp_route: AbstractRoute, handler: Handler, segments: list[str]):
        self.aiohttp_route = aiohttp_route
        self.handler = handler
        self.segments = segments


class HotRoutes:
    """``HOT_ROUTES`` resolved against the app: each with its middleware chain built once."""

    def __init__(self, app: web.Application) -> None:
        self._by_shape: dict[tuple[str, int, str], list[_Route]] = {}
        # (method, path) -> what _match found: matching a path costs ~10 µs per request
        # in the running gateway, a dict lookup a tenth of it.
        self._matched: dict[tuple[str, str], tuple[_Route, dict[str, str]] | None] = {}
        registered = {
            (route.method, route.resource.canonical): route
            for route in app.router.routes()
            if route.resource is not None
        }
        for method, path in HOT_ROUTES:
            route = registered[(method, path)]
            handler = _with_middlewares(route.handler, app.middlewares)
            segments = path.split("/")
            shape = (method, len(segments), segments[-1])
            self._by_shape.setdefault(shape, []).append(_Route(route, handler, segments))

    def match(self, method: str, path: str) -> tuple[_Route, MatchInfo] | None:
        key = (method, path)
        if key in self._matched:
            found = self._matched[key]
        else:
            found = self._match(method, path)
            if len(self._matched) >= _MATCH_CACHE_SIZE:  # many distinct paths: start over
                self._matched.clear()
            self._matched[key] = found
        if found is None:
            return None
        route, values = found
        return route, MatchInfo(route.aiohttp_route, values)

    def _match(self, method: str, path: str) -> tuple[_Route, dict[str, str]] | None:
        segments = path.split("/")
        for route in self._by_shape.get((method, len(segments), segments[-1]), ()):
            values = {}
            for pattern, segment in zip(route.segments, segments, strict=True):
                if pattern.startswith("{"):
                    if not segment:
                        break
                    values[pattern[1:-1]] = segment
                elif pattern != segment:
                    break
            else:
                return route, values
        return None


def _with_middlewares(handler: Handler, middlewares: Any) -> Handler:
    """``handler`` inside the app's middlewares, but for those marked
    ``covered_by_fast_lane`` (what they check, this front has checked already)."""
    for middleware in reversed(middlewares):
        if not getattr(middleware, "covered_by_fast_lane", False):
            handler = _bind(middleware, handler)
    return handler


def _bind(middleware: Any, inner: Handler) -> Handler:
    def call(request: web.Request) -> Awaitable[web.StreamResponse]:
        return middleware(request, inner)

    return call


class Head:
    """A parsed request head that this front may serve."""

    __slots__ = ("close", "content_length", "headers", "method", "raw_headers", "target")

    def __init__(
        self,
        method: str,
        target: str,
        raw_headers: list[tuple[bytes, bytes]],
        headers: list[tuple[str, str]],
        content_length: int,
        close: bool,
    ):
        self.method = method
        self.target = target
        self.raw_headers = raw_headers
        self.headers = headers  # raw_headers decoded
        self.content_length = content_length
        self.close = close


def parse_head(head: bytes | bytearray) -> Head | None:
    """The head of a plain HTTP/1.1 request, or None when aiohttp should serve it
    (fastpath/_http1_py.py says which requests those are)."""
    parsed = parse_request_head(bytes(head))
    return None if parsed is None else Head(*parsed)


class FastLane:
    """What every front connection shares: the app, its hot routes, its limits, the
    open connections (for idle timeouts and draining)."""

    def __init__(self, app: web.Application, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.app = app
        self.routes = HotRoutes(app)
        config = app[CONFIG]
        self.max_head_bytes = config.max_header_bytes
        self.max_body_bytes = config.max_body_bytes
        self.fallback = fallback  # aiohttp's protocol, for the connections handed over
        # The app is frozen by now: its on_response_prepare callbacks, called in turn as
        # its Signal.send would, without that coroutine per response.
        self.on_response_prepare = tuple(app.on_response_prepare)
        self.connections: set[FrontConnection] = set()
        # A burst of requests starts over several loop iterations (gateway/pacing.py).
        self.pacer = StartPacer(asyncio.get_running_loop())
        self.idle_timeout_s = config.client_idle_timeout_s
        self.draining = False
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> FrontConnection:
        if self._sweeper is None:
            self._schedule_sweep()
        return FrontConnection(self)

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(self.idle_timeout_s / 5, self._sweep)

    def _sweep(self) -> None:
        """Close the connections with no request in flight that the client has sent
        nothing on for ``idle_timeout_s``: idle keep-alives, and requests that stopped
        arriving part-way (one timer for all connections instead of one per read)."""
        deadline = asyncio.get_running_loop().time() - self.idle_timeout_s
        for connection in list(self.connections):
            if connection.task is None and connection.heard_at < deadline:
                connection.close()
        self._schedule_sweep()

    def close_idle(self) -> None:
        """Shutdown began: idle connections close now, busy ones after their answer."""
        self.draining = True
        for connection in list(self.connections):
            if connection.between_requests():
                connection.close()

    async def drain(self, timeout: float | None) -> None:
        """Wait for the requests in flight here (at most ``timeout``), then close."""
        self.close_idle()
        busy = [c.task for c in self.connections if c.task is not None]
        if busy:
            await asyncio.wait(busy, timeout=timeout)
        for connection in list(self.connections):
            connection.close()
        if self._sweeper is not None:
            self._sweeper.cancel()


class FrontConnection(asyncio.Protocol):
    """One client connection; one request at a time, in order (no pipelining overlap)."""

    def __init__(self, lane: FastLane) -> None:
        self._lane = lane
        # Kept: on CPython 3.11 each asyncio.get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._head: Head | None = None
        self._route: tuple[_Route, MatchInfo] | None = None
        self.task: asyncio.Task[None] | None = None
        # Loop time of the client's last bytes or of the last answer: what the sweep of
        # connections with no request in flight goes by.
        self.heard_at = self._loop.time()
        self._lingering = False  # answered and closing: what arrives is dropped
        self._paused = False  # reading paused: PIPELINED_BYTES wait behind a request

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._lane.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lane.connections.discard(self)
        if self.task is not None:
            self.task.cancel()  # the client hung up: the handler (and its upstream call) stops

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self.heard_at = self._loop.time()
        self._buffer += data
        if self.task is None:
            self._next_request()
        elif len(self._buffer) > PIPELINED_BYTES and not self._paused:
            assert self._transport is not None
            self._transport.pause_reading()
            self._paused = True

    # -- requests ------------------------------------------------------------------------------

    def _next_request(self) -> None:
        """Parse what the buffer holds; start the request once its body is complete."""
        buffer = self._buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0 or end > self._lane.max_head_bytes:
                if end >= 0 or len(buffer) > self._lane.max_head_bytes:
                    self._refuse_head()
                return
            head = parse_head(buffer[:end])
            route = None if head is None else self._lane.routes.match(head.method, head.target)
            if head is None or route is None or head.content_length > self._lane.max_body_bytes:
                self._hand_over()
                return
            self._head, self._route = head, route
            del buffer[: end + 4]
            assert self._transport is not None
            if receive_in_place(
                self, self._transport, head.content_length, buffer, self._start, self._heard
            ):
                return
        assert self._head is not None
        length = self._head.content_length
        if len(buffer) < length:
            return
        with memoryview(buffer) as view:
            body = bytes(view[:length])
        del buffer[:length]
        self._start(body)

    def _start(self, body: bytes | bytearray) -> None:
        head, (route, match_info) = self._head, self._route  # type: ignore[misc]
        assert head is not None
        self._head = self._route = None
        assert self._transport is not None
        request = FrontRequest(
            self._lane.app,
            head.method,
            head.target,
            head.raw_headers,
            head.headers,
            match_info,
            body,
            self._transport,
        )
        self.task = self._loop.create_task(self._serve(request, route.handler, head.close))

    async def _serve(self, request: FrontRequest, handler: Handler, close: bool) -> None:
        # Duck-typed: FrontRequest offers what the middlewares and HOT_ROUTES' handlers use.
        aiohttp_request = cast(web.Request, request)
        pacer = self._lane.pacer
        try:
            if not pacer.may_start():
                await pacer.wait()
            response = await handler(aiohttp_request)
            close = close or self._lane.draining
            if request.stream is not None:
                if response is request.stream:
                    await response.write_eof()
                else:  # a failure after the stream began
                    close = True
                payload: tuple[bytes, bytes | bytearray] = (b"", b"")
            else:
                for on_prepare in self._lane.on_response_prepare:
                    await on_prepare(aiohttp_request, response)
                payload = _serialize(cast(web.Response, response), close)
        except Exception:
            # json_errors answers every failure; reaching here is a bug in this module.
            log.exception("front connection failed on %s %s", request.method, request.path)
            self.close()
            return
        finally:
            self.task = None
        transport = self._transport
        assert transport is not None
        transport.writelines(payload)
        if close:
            self.close()
            return
        self.heard_at = self._loop.time()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._buffer:
            self._next_request()

    def _heard(self) -> None:
        """More of a body received in place (http1.BodyReceiver)."""
        self.heard_at = self._loop.time()

    def between_requests(self) -> bool:
        """No request in flight, and nothing of a next one received."""
        return self.task is None and self._head is None and not self._buffer

    def _refuse_head(self) -> None:
        """The head is over max_head_bytes: 414 if its request line is, else 431, as JSON
        in the called surface's dialect, then a lingering close. Closing at once with
        unread bytes would reset the connection, and the client could lose the answer."""
        buffer, limit = self._buffer, self._lane.max_head_bytes
        line_end = buffer.find(b"\r\n", 0, limit)
        if line_end < 0:
            error = StatusError(f"request line over the limit of {limit} bytes", 414)
            target = ""  # no whole target to tell the surface by
        else:
            error = StatusError(f"request head over the limit of {limit} bytes", 431)
            request_line = bytes(buffer[:line_end]).decode("latin-1").split(" ")
            target = request_line[1] if len(request_line) > 1 else ""
        transport = self._transport
        assert transport is not None
        transport.writelines(_serialize(error.response_for(target), close=True))
        self._lingering = True
        buffer.clear()
        if transport.can_write_eof():
            transport.write_eof()  # the answer, then FIN; the client's bytes still drain
            self._loop.call_later(LINGER_S, self.close)
        else:  # TLS has no half-close
            self.close()

    def _hand_over(self) -> None:
        """aiohttp serves this connection from now on, starting with the buffered bytes."""
        transport = self._transport
        assert transport is not None
        self._lane.connections.discard(self)
        protocol = self._lane.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        pending = bytes(self._buffer)
        self._buffer.clear()
        if pending:
            protocol.data_received(pending)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _serialize(response: web.Response, close: bool) -> tuple[bytes, bytes | bytearray]:
    """Status line, headers and body of a unary response, for one ``writelines``."""
    body = response.body
    if body is None:
        body = b""
    elif not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError(f"hot routes answer with bytes bodies, got {type(body).__name__}")
    framing = b"Content-Length: %d\r\n" % len(body)
    if close:
        framing += b"Connection: close\r\n"
    return _head(response, framing), bytes(body) if isinstance(body, memoryview) else body


def _head(response: web.StreamResponse, framing: bytes) -> bytes:
    """Status line and headers, the body's framing headers (``framing``) in place of
    any the response carries, and the blank line."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (response.status, _REASONS.get(response.status, b""))]
    for name, value in response.headers.items():
        if name.lower() not in _FRAMING_HEADERS:
            lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    lines += (framing, b"\r\n")
    return b"".join(lines)
