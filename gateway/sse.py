"""Server-Sent Events responses: headers once, then one flushed write per event."""

from __future__ import annotations

import asyncio
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


class StreamOpener:
    """Opens a request's 200 event stream once its first event is in hand.

    Made before the request goes upstream. On the fast lane (gateway/fastlane.py) the
    answer's head (its headers, ``on_response_prepare``) is made ahead, in a task that
    runs when the handler first waits, which is after its request to Triton is sent:
    while Triton computes the first token, not after it (~0.1 ms of the time to first
    token, measured). Nothing is sent until ``open``: a request that fails before its
    first event still gets its error answer. Through aiohttp, ``open`` prepares the
    response as aiohttp does."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        prepare = getattr(request, "prepare_stream", None)
        self._prepared: asyncio.Future[web.StreamResponse] | None = None
        if prepare is not None:  # a FrontRequest
            self._prepared = asyncio.ensure_future(prepare(SSE_HEADERS))

    async def open(self) -> web.StreamResponse:
        """The head sent; events follow with ``write``."""
        if self._prepared is not None:
            # A done task keeps its coroutine and context: let them go with it, not
            # at the stream's end (fewer objects for the garbage collector to walk).
            prepared, self._prepared = self._prepared, None
            response = await prepared
            self._request.start_stream(response)  # type: ignore[attr-defined]
            return response
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await response.prepare(self._request)
        return response


async def send_json(response: web.StreamResponse, value: Any, event: bytes | None = None) -> None:
    await response.write(sse_event(orjson.dumps(value), event))
