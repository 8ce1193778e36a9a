"""The /v1 stream's per-token shortcuts give exactly what the general code gives: a
chunk from pre-rendered bytes, the default chat template without Jinja, and an HTTP
event's text without the incremental decoder when it is plain ASCII."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath import framing
from fastpath.framing import sse_event
from fastpath.grpc_wire import InferResponse
from gateway.api.openai import _Call, _Chunks, default_prompt
from gateway.chat_template import DEFAULT_TEMPLATE, ChatTemplate, template_messages
from gateway.http_generate import event_payload
from gateway.openai_profiles import ReplyReader, Sampling

# Text a model may send: any character (JSON escapes, quotes, control characters,
# astral planes) but lone surrogates, which no decoded UTF-8 holds.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


def chunks(chat: bool, include_usage: bool) -> _Chunks:
    call = _Call(chat, "tiny_lm", True, include_usage, [], Sampling(prompt="p"))
    return _Chunks(call, "chatcmpl-0123456789abcdef")


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("include_usage", [True, False])
@given(text=TEXT)
@settings(max_examples=200, deadline=None)
def test_a_chunk_from_its_framing_is_the_chunk(chat: bool, include_usage: bool, text: str) -> None:
    made = chunks(chat, include_usage)
    head, tail = made.delta_framing()
    event = head + orjson.dumps(text) + tail
    assert event == sse_event(orjson.dumps(made.delta(text)))
    # ... and what OpenAI's clients parse: one data line with the text in its place.
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and b"\n" not in event[:-2]
    parsed = json.loads(event[len(b"data: ") :])
    choice = parsed["choices"][0]
    assert (choice["delta"]["content"] if chat else choice["text"]) == text
    assert ("usage" in parsed) == include_usage


MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": TEXT},
    optional={"name": st.text(max_size=5)},
)


@given(messages=st.lists(MESSAGE, min_size=1, max_size=5))
@settings(max_examples=200, deadline=None)
def test_default_prompt_is_what_the_default_template_renders(
    messages: list[dict[str, Any]],
) -> None:
    checked = template_messages(messages)
    assert default_prompt(checked) == ChatTemplate(DEFAULT_TEMPLATE).render(checked)


def grpc_reply(text: bytes, reason: str, completion_tokens: int) -> InferResponse:
    response = InferResponse()
    for name, data in (("text_output", text), ("finish_reason", reason.encode())):
        response.outputs.append((name, "BYTES", [1], {}))
        response.raw_outputs.append(memoryview(framing.serialize_bytes_tensor([data])))
    response.outputs.append(("completion_tokens", "INT32", [1], {}))
    response.raw_outputs.append(memoryview(completion_tokens.to_bytes(4, "little")))
    return response


def http_event(text: bytes, reason: str, completion_tokens: int) -> bytes:
    # Triton writes a BYTES output's raw bytes into its JSON (escaping only what JSON
    # must), so a character split across two responses is invalid UTF-8 in each.
    escaped = text.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    escaped = b"".join(b"\\u%04x" % c if c < 0x20 else bytes([c]) for c in escaped)
    return (
        b'data: {"completion_tokens":%d,"finish_reason":"%s","model_name":"m",'
        b'"model_version":"1","text_output":"%s"}\n\n'
        % (completion_tokens, reason.encode(), escaped)
    )


@given(text=TEXT, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6))
@settings(max_examples=300, deadline=None)
def test_http_events_read_as_grpc_replies_whatever_the_split(text: str, cuts: list[int]) -> None:
    data = text.encode()
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points)] or [b""]
    over_http, over_grpc = ReplyReader(), ReplyReader()
    for i, piece in enumerate(pieces):
        reason = "length" if i == len(pieces) - 1 else ""
        got = over_http.read(event_payload(http_event(piece, reason, i + 1)))
        assert got == over_grpc.read(grpc_reply(piece, reason, i + 1))
    assert over_http.flush() == over_grpc.flush()
    assert over_http.text == over_grpc.text == text
    assert over_http.finish_reason == over_grpc.finish_reason == "length"
    assert over_http.completion_tokens == over_grpc.completion_tokens == len(pieces)
