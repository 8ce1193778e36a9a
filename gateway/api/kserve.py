"""Triton's own HTTP API (KServe v2 + generate extension), served from the fleet: over
each backend's HTTP endpoint where it is known (infer, generate_stream), else gRPC."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import grpc
import orjson
from aiohttp import web
from tritonclient.grpc import service_pb2 as pb

from fastpath import grpc_wire
from fastpath.framing import is_utf8, sse_event

from .. import kserve_codec as codec
from .. import sse
from ..config import GatewayConfig
from ..errors import (
    BadRequest,
    GatewayError,
    GatewayTimeout,
    ModelGone,
    UpstreamError,
)
from ..fastlane import FrontStreamResponse
from ..fleet import Backend, Fleet, ModelInfo
from ..forward import (
    Replies,
    StreamReplies,
    Timeouts,
    admit,
    any_backend,
    check_max_tokens,
    decode_reply,
    failure_after_answer,
    open_stream,
    request_timeouts,
    with_failover,
)
from ..http_generate import (
    EventRelay,
    StreamAttempts,
    client_fault_status,
    error_message,
    event_payload,
)
from ..http_stream import SseStream
from ..http_upstream import (
    FORWARDED_REPLY_HEADERS,
    FORWARDED_REQUEST_HEADERS,
    TRACE_HEADERS,
    HttpReply,
    UpstreamConnectionError,
)
from ..protojson import message_to_dict
from ..router import Lease
from ..telemetry import TRAIL
from ..upstream import upstream_error
from .keys import CONFIG, FLEET, LIFECYCLE

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
    if request.app[LIFECYCLE].draining:
        return _json({"error": "the gateway is shutting down", "type": "draining"}, status=503)
    if request.app[FLEET].ready:
        return web.Response(status=200)
    return _json({"error": "no backend is ready", "type": "no_backend"}, status=503)


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
    backends = request.app[FLEET].ready_backends(model, version)
    reply = await any_backend(
        backends,
        lambda b: b.channel.control.ModelMetadata(
            pb.ModelMetadataRequest(name=model, version=version), timeout=5
        ),
    )
    return _json(message_to_dict(reply))


async def model_config(request: web.Request) -> web.Response:
    model, version = _target(request)
    backends = request.app[FLEET].ready_backends(model, version)
    reply = await any_backend(
        backends,
        lambda b: b.channel.control.ModelConfig(
            pb.ModelConfigRequest(name=model, version=version), timeout=5
        ),
    )
    return _json(message_to_dict(reply.config))


async def model_ready(request: web.Request) -> web.Response:
    model, version = _target(request)
    try:
        request.app[FLEET].ready_backends(model, version)
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
    request[TRAIL].model = model
    request.app[FLEET].candidates(model, version)  # unknown model: 404 before reading the body
    body = await request.read()
    header_length = request.headers.get("Inference-Header-Content-Length")
    parsed = codec.check_infer(body, header_length)
    _check_tensor_limits(request.app[CONFIG], parsed)
    # The request goes to a backend's HTTP endpoint as it is (validated above), or, to a
    # backend whose HTTP endpoint is not known, over gRPC (the gateway writes the answer).
    timeout = request_timeouts(request).total
    grpc_call: list[codec.InferCall] = []  # encoded once, only if a backend needs it

    async def on(backend: Backend, left: float) -> web.Response:
        if backend.http is not None:
            headers = _forwarded_headers(request, lease.trail.metadata, header_length is None)
            reply = await backend.http.post(request.raw_path, headers, body, left)
            if reply.status == 404:  # the fleet knows the model: this backend lost it
                raise ModelGone(reply.body.decode("utf-8", "replace"))
            if reply.status == 500:
                message = error_message(reply.body)
                if client_fault_status(500, message) == 400:
                    raise BadRequest(message)
            return _passthrough(reply)
        if not grpc_call:
            whole = parsed
            if not whole.complete:  # checked with long strings elided: parse it all now
                whole = codec.parse_infer(*codec.decode_infer_body(body, header_length))
            grpc_call.append(codec.encode_infer(model, version, whole))
        call = grpc_call[0]
        wire = await backend.channel.infer(call.wire, left, lease.trail.metadata)
        out, out_header_length = codec.encode_infer_response(
            decode_reply(grpc_wire.decode_infer_response, wire), call
        )
        if out_header_length is None:
            return web.Response(body=out, content_type=_JSON)
        return web.Response(
            body=out,
            content_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(out_header_length)},
        )

    with admit(request, model, version, None) as lease:
        response = await with_failover(lease, on, timeout)
        lease.first_response()
    return response


def _check_tensor_limits(config: GatewayConfig, parsed: codec.ParsedInfer) -> None:
    """400 over max_inputs inputs or max_tensor_elements elements in one (0: unlimited)."""
    if config.max_inputs and len(parsed.inputs) > config.max_inputs:
        raise BadRequest(
            f"the request has {len(parsed.inputs)} inputs, over the limit of {config.max_inputs}"
        )
    if config.max_tensor_elements:
        for name, _datatype, shape, _params in parsed.inputs:
            elements = math.prod(shape)
            if elements > config.max_tensor_elements:
                raise BadRequest(
                    f"input '{name}' has {elements} elements, "
                    f"over the limit of {config.max_tensor_elements}"
                )


def _forwarded_headers(
    request: web.Request, trace: Sequence[tuple[str, str]], json_body: bool
) -> list[tuple[str, str]]:
    """The client's headers Triton needs, the body's kind, and the gateway's own trace
    context."""
    headers = [
        (name, request.headers[name])
        for name in FORWARDED_REQUEST_HEADERS
        if name in request.headers and name not in TRACE_HEADERS
    ]
    headers.append(("Content-Type", _JSON if json_body else "application/octet-stream"))
    headers.extend(trace)
    return headers


def _passthrough(reply: HttpReply) -> web.Response:
    headers = {
        name.decode(): reply.headers[name].decode("latin-1")
        for name in FORWARDED_REPLY_HEADERS
        if name in reply.headers
    }
    body = reply.body
    if b"content-encoding" not in reply.headers:
        body, headers = _valid_utf8_json(body, headers)
    return web.Response(status=reply.status, body=body, headers=headers)


def _valid_utf8_json(
    body: bytes | bytearray, headers: dict[str, str]
) -> tuple[bytes | bytearray, dict[str, str]]:
    """Triton writes BYTES outputs into JSON as they are, invalid UTF-8 included, which
    no JSON parser accepts: such bytes become U+FFFD, as in the gateway's own answers
    (binary outputs carry them exactly)."""
    length_header = headers.get("inference-header-content-length")
    header_length = int(length_header) if length_header is not None else len(body)
    json_part = memoryview(body)[:header_length]
    if is_utf8(json_part):
        return body, headers
    fixed = str(json_part, "utf-8", "replace").encode()
    if length_header is not None:
        headers["inference-header-content-length"] = str(len(fixed))
    return fixed + memoryview(body)[header_length:], headers


class _Generate:
    """A parsed generate request: its body, and the wire bytes for a given backend."""

    def __init__(self, request: web.Request, body: dict[str, Any]) -> None:
        self.model, self.version = _target(request)
        request[TRAIL].model = self.model
        self.fleet: Fleet = request.app[FLEET]
        self.body = body
        nested = body.get("parameters")
        nested_max = nested.get("max_tokens") if isinstance(nested, dict) else None
        # A "parameters" value wins over a top-level one (encode_generate merges so).
        check_max_tokens(request, body.get("max_tokens") if nested_max is None else nested_max)

    def info(self, backend: Backend) -> ModelInfo:
        return self.fleet.model_info(backend, self.model, self.version)

    def wire_for(self, backend: Backend) -> bytes:
        return codec.encode_generate(self.model, self.info(backend), self.body)

    def prompt(self) -> bytes | None:
        text = self.body.get("text_input")
        return text.encode() if isinstance(text, str) else None


async def generate(request: web.Request) -> web.Response:
    gen = _Generate(request, codec.parse_json(await request.read()))
    timeouts = request_timeouts(request)
    trail = request[TRAIL]  # its metadata follows the attempt in progress

    async def one_reply(backend: Backend, left: float) -> Any:
        wire = gen.wire_for(backend)
        if not gen.info(backend).decoupled:
            reply = await backend.channel.infer(wire, left, trail.metadata)
            return decode_reply(grpc_wire.decode_infer_response, reply)
        attempt = timeouts._replace(total=left)
        replies = [r async for r in StreamReplies(backend, wire, attempt, trail.metadata)]
        if len(replies) != 1:
            raise BadRequest(
                f"model sent {len(replies)} responses; use generate_stream for streaming output"
            )
        return replies[0]

    with admit(request, gen.model, gen.version, gen.prompt()) as lease:
        reply = await with_failover(lease, one_reply, timeouts.total)
        lease.first_response()
        body = codec.generate_response_json(reply)
        lease.count_tokens(_tokens_so_far(body, 1))
    return _json(body)


def _tokens_so_far(body: dict[str, Any], replies: int) -> int:
    """Tokens generated so far, charged to the tenant: the model's running
    ``completion_tokens`` output when it has one (tiny_lm does), else one per reply."""
    count = body.get("completion_tokens")
    return count if type(count) is int else replies


# A streamed event as sent to the client, and its payload: the model's running
# completion_tokens output, when it has one, is charged to the tenant as it streams.
Event = tuple[bytes, dict[str, Any]]


async def generate_stream(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    gen = _Generate(request, codec.parse_json(raw))
    timeouts = request_timeouts(request)
    deadline = asyncio.get_running_loop().time() + timeouts.total
    with admit(request, gen.model, gen.version, gen.prompt()) as lease:
        attempts = _StreamAttempts(gen, raw, request.raw_path, lease, timeouts, deadline)
        opener = sse.StreamOpener(request)
        first, rest = await open_stream(lease, attempts, timeouts.total)
        try:
            response = await opener.open()
            event, payload = first
            await response.write(event)
            # Recorded once the client has its first token: its bookkeeping waits.
            lease.first_response()
            lease.count_tokens(_tokens_so_far(payload, 1))
            if attempts.live_http and isinstance(response, FrontStreamResponse):
                await _PassOn(attempts.live_http[0], lease, response).run()
            else:
                replies = 1
                async for event, payload in rest:
                    replies += 1
                    lease.count_tokens(_tokens_so_far(payload, replies))
                    await response.write(event)
        except (
            grpc.aio.AioRpcError,
            UpstreamError,
            GatewayTimeout,
            UpstreamConnectionError,
        ) as exc:
            # After the first byte nothing is replayed: the client is told, explicitly.
            await sse.send_json(response, {"error": failure_after_answer(exc).message})
        finally:
            await rest.aclose()
    await response.write_eof()
    return response


class _StreamAttempts(StreamAttempts):
    """Starts a ``generate_stream`` request on a backend: over the backend's HTTP
    endpoint when it is known, else gRPC."""

    __slots__ = ("_gen", "_path", "_raw")

    def __init__(
        self,
        gen: _Generate,
        raw: bytes,
        path: str,
        lease: Lease,
        timeouts: Timeouts,
        deadline: float,
    ) -> None:
        super().__init__(lease, timeouts, deadline)
        self._gen = gen
        self._raw = raw
        self._path = path

    def __call__(self, backend: Backend, left: float) -> Replies[Event]:
        if backend.http is not None:
            # The request is checked as gRPC would check it (Triton's HTTP endpoint
            # answers some faults with 500s), once it is sent: while Triton works.
            return self.over_http(backend, self._path, self._raw, check=self._gen.wire_for)
        return self.over_grpc(backend, self._gen.wire_for(backend), left, _event_of)


def _event_of(reply: Any) -> Event:
    """A gRPC response as the event Triton's HTTP generate_stream would have sent."""
    body = codec.generate_response_json(reply)
    return sse_event(orjson.dumps(body)), body


class _PassOn(EventRelay):
    """The rest of an HTTP stream on the fast lane, each event passed on as it is.
    Triton's error event is passed on too, and ends the stream."""

    __slots__ = ("_replies", "_response")

    def __init__(self, stream: SseStream, lease: Lease, response: FrontStreamResponse) -> None:
        super().__init__(stream, lease)
        self._response = response
        self._replies = 1  # the first went to the client before the relay began

    def on_event(self, event: bytes) -> None:
        self._replies += 1
        self._response.write_chunk(event)
        # Parsed only when it matters: an anonymous request's token count is not charged.
        if not (self.lease.charges_tokens or b'"error"' in event):
            return
        try:
            payload = event_payload(event)
        except UpstreamError:
            self.stream.close()  # Triton ends the stream after an error; so does the relay
            return
        self.lease.count_tokens(_tokens_so_far(payload, self._replies))
