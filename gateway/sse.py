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
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await response.prepare(request)
    return response


async def send_json(response: web.StreamResponse, value: Any, event: bytes | None = None) -> None:
    await response.write(sse_event(orjson.dumps(value), event))
