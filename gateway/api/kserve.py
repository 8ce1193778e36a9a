"""Triton's own HTTP API (KServe v2 + generate extension), served from the fleet over gRPC."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import orjson
from aiohttp import web
from tritonclient.grpc import service_pb2 as pb

from fastpath import grpc_wire

from .. import kserve_codec as codec
from .. import sse
from ..errors import BadRequest, GatewayError, UpstreamError
from ..fleet import Backend, Fleet
from ..forward import decode_reply, request_timeout_s, stream_replies, with_failover
from ..protojson import message_to_dict
from ..upstream import is_connection_failure, upstream_error
from .keys import FLEET

T = TypeVar("T")
_JSON = "application/json"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v2/health/live", health_live)
    app.router.add_get("/v2/health/ready", health_ready)
    app.router.add_get("/v2", server_metadata)
    app.router.add_post("/v2/repository/index", repository_index)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, model_metadata)
        app.router.add_get(prefix + "/config", model_config)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_post(prefix + "/infer", infer)
        app.router.add_post(prefix + "/generate", generate)
        app.router.add_post(prefix + "/generate_stream", generate_stream)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _target(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


# -- health and metadata ---------------------------------------------------------------


async def health_live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def health_ready(request: web.Request) -> web.Response:
    if request.app[FLEET].ready:
        return web.Response(status=200)
    return _json({"error": "no backend is ready", "type": "unavailable"}, status=503)


async def server_metadata(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    backend = fleet.any_ready_backend()
    meta = await _control(
        backend.channel.control.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    )
    return _json({"name": "meshgate", "version": meta.version, "extensions": list(meta.extensions)})


async def repository_index(request: web.Request) -> web.Response:
    body = await request.read()
    if body:
        codec.parse_json(body)  # Triton accepts an optional JSON object; reject garbage
    return _json(request.app[FLEET].repository_index())


async def model_metadata(request: web.Request) -> web.Response:
    model, version = _target(request)
    backends = request.app[FLEET].route(model, version)
    reply = await with_failover(
        backends,
        lambda b: b.channel.control.ModelMetadata(
            pb.ModelMetadataRequest(name=model, version=version), timeout=5
        ),
    )
    return _json(message_to_dict(reply))


async def model_config(request: web.Request) -> web.Response:
    model, version = _target(request)
    backends = request.app[FLEET].route(model, version)
    reply = await with_failover(
        backends,
        lambda b: b.channel.control.ModelConfig(
            pb.ModelConfigRequest(name=model, version=version), timeout=5
        ),
    )
    return _json(message_to_dict(reply.config))


async def model_ready(request: web.Request) -> web.Response:
    model, version = _target(request)
    try:
        request.app[FLEET].route(model, version)
    except GatewayError as exc:
        # Triton answers 400 for a model that is not ready, whatever the reason.
        return _json({"error": exc.message}, status=400)
    return web.Response(status=200)


async def _control(awaitable: Awaitable[T]) -> T:
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise upstream_error(exc) from None


# -- inference --------------------------------------------------------------------------


async def infer(request: web.Request) -> web.Response:
    model, version = _target(request)
    fleet: Fleet = request.app[FLEET]
    backends = fleet.route(model, version)
    body = await request.read()
    header, tail = codec.decode_infer_body(
        body, request.headers.get("Inference-Header-Content-Length")
    )
    call = codec.encode_infer(model, version, header, tail)
    timeout = request_timeout_s(request)
    reply = await with_failover(backends, lambda b: b.channel.infer(call.wire, timeout))
    out, header_length = codec.encode_infer_response(
        decode_reply(grpc_wire.decode_infer_response, reply), call
    )
    if header_length is None:
        return web.Response(body=out, content_type=_JSON)
    return web.Response(
        body=out,
        content_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


async def _generate_setup(
    request: web.Request,
) -> tuple[list[Backend], Callable[[Backend], bytes], bool]:
    """Route a generate request; returns backends, a per-backend wire encoder, decoupled."""
    model, version = _target(request)
    fleet: Fleet = request.app[FLEET]
    backends = fleet.route(model, version)
    body = codec.parse_json(await request.read())

    def wire_for(backend: Backend) -> bytes:
        return codec.encode_generate(model, fleet.model_info(backend, model, version), body, True)

    return backends, wire_for, fleet.model_info(backends[0], model, version).decoupled


async def generate(request: web.Request) -> web.Response:
    backends, wire_for, decoupled = await _generate_setup(request)
    timeout = request_timeout_s(request)

    async def one_reply(backend: Backend) -> Any:
        wire = wire_for(backend)
        if not decoupled:
            return decode_reply(
                grpc_wire.decode_infer_response, await backend.channel.infer(wire, timeout)
            )
        replies = [r async for r in stream_replies(backend, wire, timeout)]
        if len(replies) != 1:
            raise BadRequest(
                f"model sent {len(replies)} responses; use generate_stream for streaming output"
            )
        return replies[0]

    return _json(codec.generate_response_json(await with_failover(backends, one_reply)))


async def generate_stream(request: web.Request) -> web.StreamResponse:
    backends, wire_for, _ = await _generate_setup(request)
    timeout = request_timeout_s(request)
    response: web.StreamResponse | None = None
    for attempt, backend in enumerate(backends):
        replies = stream_replies(backend, wire_for(backend), timeout)
        try:
            async for reply in replies:
                if response is None:
                    response = await sse.open_stream(request)
                await sse.send_json(response, codec.generate_response_json(reply))
            break
        except grpc.aio.AioRpcError as exc:
            if response is None:
                if attempt == 0 and len(backends) > 1 and is_connection_failure(exc):
                    continue
                raise upstream_error(exc) from None
            await sse.send_json(response, {"error": upstream_error(exc).message})
            break
        except UpstreamError as exc:
            if response is None:
                raise
            await sse.send_json(response, {"error": exc.message})
            break
        finally:
            await replies.aclose()
    if response is None:
        response = await sse.open_stream(request)
    await response.write_eof()
    return response
