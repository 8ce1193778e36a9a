"""Server-Sent Events responses: headers once, then one flushed write per event."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from fastpath.framing import sse_event

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Reverse proxies in front of the gateway must not buffer the stream.
    "X-Accel-Buffering": "no",
}


async def open_stream(request: web.Request) -> web.StreamResponse:
    """The 200 answer's head sent; events follow with ``write``. On the fast lane
    (gateway/fastlane.py) the request opens the stream on its own connection."""
    open_front_stream = getattr(request, "open_stream", None)
    if open_front_stream is not None:
        response: web.StreamResponse = await open_front_stream(SSE_HEADERS)
        return response
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await response.prepare(request)
    return response


async def send_json(response: web.StreamResponse, value: Any, event: bytes | None = None) -> None:
    await response.write(sse_event(orjson.dumps(value), event))
