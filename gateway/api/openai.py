"""The OpenAI API (/v1): chat completions, completions and models, served from the fleet.

Every completion is one generate stream (``forward.open_stream``). ``stream: true`` goes
to Triton's HTTP ``generate_stream`` where the backend's HTTP endpoint is known
(gateway/http_generate.py), else gRPC ModelStreamInfer, and relays each Triton response
as a chunk (on the fast lane from the upstream connection's callback). ``stream: false``
asks the model for one answer over gRPC and gathers whatever responses it sends.
Request fields are mapped, ignored or refused as the README's "OpenAI API" section says.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any
from urllib.parse import quote

import grpc
import orjson
from aiohttp import web

from fastpath.framing import sse_event

from .. import kserve_codec as codec
from .. import sse
from ..chat_template import ChatTemplate, template_messages
from ..config import GatewayConfig
from ..errors import BadRequest, GatewayError, ModelGone, ModelNotFound, NotFound, Unavailable
from ..fastlane import FrontStreamResponse
from ..fleet import Backend, Fleet
from ..forward import (
    Replies,
    StreamRest,
    Timeouts,
    admit,
    check_max_tokens,
    failure_after_answer,
    open_stream,
    request_timeouts,
)
from ..http_generate import EventRelay, StreamAttempts, event_payload
from ..http_stream import SseStream
from ..http_upstream import UpstreamConnectionError
from ..metrics import NONE
from ..openai_profiles import (
    ReplyReader,
    Sampling,
    Usage,
    check_profile_name,
    is_text_model,
    profile_for,
)
from ..router import Lease
from ..telemetry import TRAIL
from .keys import CONFIG, FLEET


@dataclass(frozen=True)
class _Surface:
    """Per-app state: chat templates by model (others get ``DEFAULT_TEMPLATE``), and
    when the gateway started."""

    templates: dict[str, ChatTemplate]
    started: int

    def prompt(self, model: str, messages: list[dict[str, str]]) -> str:
        """The model's chat template applied to ``messages``."""
        template = self.templates.get(model)
        if template is None:
            return default_prompt(messages)
        return template.render(messages)


def default_prompt(messages: list[dict[str, str]]) -> str:
    """What ``DEFAULT_TEMPLATE`` renders (tests/unit/test_openai_chunks.py checks it),
    without Jinja: a render costs ~9 µs hot and ~10x that on a request's first touch."""
    lines = [f"{message['role']}: {message['content']}\n" for message in messages]
    lines.append("assistant:")
    return "".join(lines)


SURFACE = web.AppKey("openai", _Surface)


def add_routes(app: web.Application) -> None:
    """Register /v1; a bad profile name or chat template in the config fails startup."""
    config: GatewayConfig = app[CONFIG]
    templates = {}
    for model, settings in config.models.items():
        check_profile_name(model, settings.profile)
        if settings.chat_template is not None:
            templates[model] = ChatTemplate.from_file(settings.chat_template)
    app[SURFACE] = _Surface(templates, int(time.time()))
    # Partials, not handlers that await _complete: a frame fewer lives as long as a stream.
    app.router.add_post("/v1/chat/completions", partial(_complete, chat=True))
    app.router.add_post("/v1/completions", partial(_complete, chat=False))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)


def _json(value: Any) -> web.Response:
    return web.Response(body=orjson.dumps(value), content_type="application/json")


# -- models -----------------------------------------------------------------------------


def _model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "meshgate"}


async def list_models(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    names = {
        name
        for backend in fleet.backends
        if backend.ready
        for name in backend.models
        if is_text_model(fleet.model_info(backend, name))
    }
    created = request.app[SURFACE].started
    return _json({"object": "list", "data": [_model_object(n, created) for n in sorted(names)]})


async def get_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    _check_text_model(request.app[FLEET], model)
    return _json(_model_object(model, request.app[SURFACE].started))


def _check_text_model(fleet: Fleet, model: str) -> None:
    """Unknown and non-text models are both 404; known but not ready is 503."""
    try:
        backends = fleet.ready_backends(model)
    except NotFound:
        raise ModelNotFound(f"The model '{model}' does not exist") from None
    for backend in backends:
        try:
            info = fleet.model_info(backend, model)
            break
        except ModelGone:
            continue  # discovery saw it go there since its slot was marked READY
    else:
        raise Unavailable(f"no backend has model '{model}' ready")
    if not is_text_model(info):
        raise ModelNotFound(
            f"model '{model}' is not a text model (it needs a BYTES input 'text_input'"
            " and an output 'text_output')"
        )


# -- request fields ---------------------------------------------------------------------

# Mapped to Triton by both endpoints, and by one of them.
_MAPPED = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream"}
    | {"stream_options", "user"}
)
_MAPPED_CHAT = frozenset({"messages", "max_completion_tokens"})
_MAPPED_TEXT = frozenset({"prompt"})
# Accepted and ignored: they do not change what a Triton text model generates.
_IGNORED = frozenset({"store", "metadata", "service_tier", "parallel_tool_calls"})
# Accepted only at their no-op value: any other value asks for something we cannot do.
_NO_OP_ONLY: dict[str, Any] = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logprobs": False,
    "top_logprobs": 0,
    "logit_bias": {},
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
    "response_format": {"type": "text"},
    "modalities": ["text"],
    "echo": False,
    "best_of": 1,
    "suffix": "",
}
_SEED_LIMIT = 2**63  # vLLM takes a signed 64-bit seed, tiny_lm an unsigned one


@dataclass(frozen=True)
class _Call:
    """A validated completion request; a chat's prompt is filled in by its template."""

    chat: bool
    model: str
    stream: bool
    include_usage: bool
    messages: list[dict[str, str]]
    sampling: Sampling


def _parse(body: dict[str, Any], chat: bool) -> _Call:
    known = _MAPPED | (_MAPPED_CHAT if chat else _MAPPED_TEXT) | _IGNORED | _NO_OP_ONLY.keys()
    for name, value in body.items():
        if name not in known:
            raise BadRequest(f"Unrecognized request argument supplied: {name}", param=name)
        if name in _NO_OP_ONLY and value is not None and value != _NO_OP_ONLY[name]:
            raise BadRequest(f"'{name}' is not supported by this gateway", param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", param="model")
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise BadRequest(f"'n' must be 1 (one choice per request), got {n!r}", param="n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    include_usage = _stream_options(body.get("stream_options"), bool(stream))
    max_tokens = _integer(body, "max_tokens", 1, None)
    if chat:
        # max_completion_tokens is OpenAI's newer name; it wins when both are given.
        max_tokens = _integer(body, "max_completion_tokens", 1, None) or max_tokens
        messages = template_messages(body.get("messages"))
        prompt = ""
    else:
        messages = []
        prompt = _prompt(body.get("prompt"))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("'user' must be a string", param="user")
    sampling = Sampling(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        seed=_integer(body, "seed", 0, _SEED_LIMIT - 1),
        stop=_stop(body.get("stop")),
        user=user,
    )
    return _Call(chat, model, bool(stream), include_usage, messages, sampling)


def _stream_options(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise BadRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    if not isinstance(value, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    include_usage = value.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest("'stream_options.include_usage' must be a boolean", param="stream_options")
    return include_usage


def _integer(body: dict[str, Any], name: str, low: int, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise BadRequest(f"'{name}' must be {bound}, got {value!r}", param=name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be a number in [{low}, {high}], got {value!r}", param=name)
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise BadRequest("'stop' must be a string or an array of strings", param="stop")
    return tuple(w for w in words if w)  # an empty stop string would match at once


def _prompt(value: Any) -> str:
    # One prompt per request: a list would ask for one choice per prompt.
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise BadRequest("'prompt' must be a string (one prompt, not tokens)", param="prompt")
    return value


# -- completions ------------------------------------------------------------------------


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    trail = request[TRAIL]
    trail.model = NONE  # an inference request, though its body may name no valid model
    call = _parse(codec.parse_json(await request.read()), chat)
    trail.model = call.model
    fleet: Fleet = request.app[FLEET]
    _check_text_model(fleet, call.model)
    sampling = call.sampling
    check_max_tokens(request, sampling.max_tokens)
    limit = request.app[CONFIG].max_tokens_limit
    if limit and sampling.max_tokens is None:
        sampling = replace(sampling, max_tokens=limit)  # no cap asked for: the gateway's
    if chat:
        prompt = request.app[SURFACE].prompt(call.model, call.messages)
        sampling = replace(sampling, prompt=prompt)
    configured = request.app[CONFIG].model_settings(call.model).profile
    chunks = _Chunks(call, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}")

    timeouts = request_timeouts(request)
    deadline = asyncio.get_running_loop().time() + timeouts.total
    with admit(request, call.model, "", sampling.prompt.encode()) as lease:
        reader = _MeteredReader(lease)
        attempts = _CompletionAttempts(
            fleet, call, configured, sampling, chunks.id, lease, reader, timeouts, deadline
        )
        opener = sse.StreamOpener(request) if call.stream else None
        first, rest = await open_stream(lease, attempts, timeouts.total)
        try:
            if opener is not None:
                relayed = attempts.live_http[0] if attempts.live_http else None
                return await _stream(opener, chunks, sampling, reader, first, rest, lease, relayed)
            lease.first_response()
            await _read_all(rest)
            reader.flush()
            usage = reader.usage(sampling.prompt)
            reason = reader.final_reason(usage, sampling.max_tokens)
            return _json(chunks.whole(reader.text, reason, usage))
        finally:
            await rest.aclose()


class _CompletionAttempts(StreamAttempts):
    """Starts a completion on a backend: its replies are each response's new text, read
    by ``reader`` as it arrives, so no frame holds a response (and the buffers it views)
    while the next is awaited."""

    __slots__ = ("_call", "_configured", "_fleet", "_id", "_reader", "_sampling")

    def __init__(
        self,
        fleet: Fleet,
        call: _Call,
        configured: str | None,
        sampling: Sampling,
        completion_id: str,
        lease: Lease,
        reader: ReplyReader,
        timeouts: Timeouts,
        deadline: float,
    ) -> None:
        super().__init__(lease, timeouts, deadline)
        self._fleet = fleet
        self._call = call
        self._configured = configured  # the model's profile, if the config names one
        self._sampling = sampling
        self._id = completion_id
        self._reader = reader

    def __call__(self, backend: Backend, left: float) -> Replies[str]:
        call = self._call
        info = self._fleet.model_info(backend, call.model)
        body = profile_for(info, self._configured).request(
            info, self._sampling, self._id, call.stream
        )
        # A whole answer is asked for as one response, over gRPC: Triton notices an
        # HTTP client's hang-up only when it next writes, which for one response is at
        # the end, while a cancelled gRPC call stops the model at its next token.
        if backend.http is None or not call.stream:
            wire = codec.encode_generate(info.name, info, body)
            return self.over_grpc(backend, wire, left, self._reader.read)
        path = f"/v2/models/{quote(info.name, safe='')}/versions/{info.version}/generate_stream"
        return _texts(self.over_http(backend, path, orjson.dumps(body)), self._reader)


async def _texts(
    events: AsyncGenerator[tuple[bytes, dict[str, Any]], None], reader: ReplyReader
) -> AsyncGenerator[str, None]:
    """The new text of each of Triton's HTTP events, as ``reader`` reads it."""
    try:
        async for _event, payload in events:
            yield reader.read(payload)
    finally:
        await events.aclose()


async def _read_all(texts: StreamRest[str]) -> None:
    """The rest of an answer, read (its reader keeps the text)."""
    try:
        async for _text in texts:
            pass
    except (grpc.aio.AioRpcError, UpstreamConnectionError) as exc:
        raise failure_after_answer(exc) from None


async def _stream(
    opener: sse.StreamOpener,
    chunks: _Chunks,
    sampling: Sampling,
    reader: ReplyReader,
    first: str,
    rest: StreamRest[str],
    lease: Lease,
    live_http: SseStream | None,
) -> web.StreamResponse:
    """Relay each response as a chunk: on the fast lane, an HTTP stream's chunks are
    written from its connection's callback (gateway/http_generate.py). After the headers
    are sent an error can only be told in-band: an ``error`` event, and no ``[DONE]``, so
    the client cannot take the cut stream for a complete one."""
    response = await opener.open()
    await sse.send_json(response, chunks.delta(first, first=True))
    lease.first_response()  # once the client has its first token: the bookkeeping waits
    try:
        if live_http is not None and isinstance(response, FrontStreamResponse):
            relay = _TextRelay(live_http, lease, response, chunks, reader)
            await relay.run()
            if relay.error is not None:
                raise relay.error
        else:
            async for text in rest:
                if text:
                    await sse.send_json(response, chunks.delta(text))
    except (grpc.aio.AioRpcError, GatewayError, UpstreamConnectionError) as exc:
        await response.write(sse_event(failure_after_answer(exc).openai_body(), b"error"))
        return response
    tail = reader.flush()
    if tail:
        await sse.send_json(response, chunks.delta(tail))
    usage = reader.usage(sampling.prompt)
    await sse.send_json(response, chunks.finish(reader.final_reason(usage, sampling.max_tokens)))
    if chunks.include_usage:
        await sse.send_json(response, chunks.usage(usage))
    await response.write(b"data: [DONE]\n\n")
    return response


class _TextRelay(EventRelay):
    """The rest of an HTTP stream on the fast lane, each event's text written as a chunk
    from the upstream connection's callback. An error event ends the stream (``error``)."""

    __slots__ = ("_head", "_reader", "_response", "_tail", "error")

    def __init__(
        self,
        stream: SseStream,
        lease: Lease,
        response: FrontStreamResponse,
        chunks: _Chunks,
        reader: ReplyReader,
    ) -> None:
        super().__init__(stream, lease)
        self._response = response
        self._reader = reader
        self._head, self._tail = chunks.delta_framing()
        self.error: GatewayError | None = None

    def on_event(self, event: bytes) -> None:
        try:
            text = self._reader.read(event_payload(event))
        except GatewayError as exc:
            self.error = exc
            self.stream.close()  # Triton ends the stream after an error; so does the relay
            return
        if text:
            self._response.write_chunk(self._head + orjson.dumps(text) + self._tail)


class _MeteredReader(ReplyReader):
    """Charges the request's tenant as completion tokens arrive: the model's running
    count after each reply, and the final usage (word count if the model sends none)."""

    def __init__(self, lease: Lease) -> None:
        super().__init__()
        self._lease = lease

    def read(self, reply: Any) -> str:
        text = super().read(reply)
        if self.completion_tokens is not None:
            self._lease.count_tokens(self.completion_tokens)
        return text

    def usage(self, prompt: str) -> Usage:
        usage = super().usage(prompt)
        self._lease.count_tokens(usage.completion_tokens)
        return usage


# A text no model sends, whose JSON string marks where a chunk's text goes.
_MARK = "\x00meshgate-text\x00"
_MARK_JSON = orjson.dumps(_MARK)


class _Chunks:
    """OpenAI's response objects for one chat or text completion."""

    def __init__(self, call: _Call, completion_id: str) -> None:
        self.id = completion_id
        self.chat = call.chat
        self.include_usage = call.include_usage
        created = int(time.time())
        kinds = (
            ("chat.completion", "chat.completion.chunk") if call.chat else ("text_completion",) * 2
        )
        self._whole_head = {
            "id": completion_id,
            "object": kinds[0],
            "created": created,
            "model": call.model,
        }
        self._chunk_head = {**self._whole_head, "object": kinds[1]}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {**self._chunk_head, "choices": [{"index": 0, **choice}]}
        if self.include_usage:
            chunk["usage"] = None  # OpenAI's chunks say so until the usage chunk
        return chunk

    def delta_framing(self) -> tuple[bytes, bytes]:
        """The SSE event of ``delta(text)`` around the JSON string of ``text``: an event
        is ``head + orjson.dumps(text) + tail``, byte for byte what
        ``sse_event(orjson.dumps(delta(text)))`` is, without a dict per chunk."""
        event = sse_event(orjson.dumps(self.delta(_MARK)))
        head, found, tail = event.partition(_MARK_JSON)
        assert found and _MARK_JSON not in tail
        return head, tail

    def delta(self, text: str, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return self._chunk({"text": text, "logprobs": None, "finish_reason": None})
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return self._chunk({"delta": delta, "logprobs": None, "finish_reason": None})

    def finish(self, reason: str) -> dict[str, Any]:
        if not self.chat:
            return self._chunk({"text": "", "logprobs": None, "finish_reason": reason})
        return self._chunk({"delta": {}, "logprobs": None, "finish_reason": reason})

    def usage(self, usage: Usage) -> dict[str, Any]:
        return {**self._chunk_head, "choices": [], "usage": usage.as_json()}

    def whole(self, text: str, reason: str, usage: Usage) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=reason)
        return {**self._whole_head, "choices": [choice], "usage": usage.as_json()}
