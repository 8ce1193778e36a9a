"""forward.StreamReplies: a ModelStreamInfer call's decoded responses, over a scripted call."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from tritonclient.grpc import service_pb2 as pb

from gateway.errors import ModelGone, UpstreamError, UpstreamStalled
from gateway.fleet import Backend
from gateway.forward import StreamReplies, Timeouts


def response(text: bytes = b"", error: str = "", final: bool | None = None) -> bytes:
    """A ModelStreamInferResponse as Triton sends it: a one-element BYTES output, or an
    error message (or neither: a response without outputs, e.g. a final flag), marked
    ``triton_final_response`` when ``final`` is given (Triton does for decoupled models)."""
    message = pb.ModelStreamInferResponse(error_message=error)
    if final is not None:
        message.infer_response.parameters["triton_final_response"].bool_param = final
    if text:
        output = message.infer_response.outputs.add(name="text_output", datatype="BYTES")
        output.shape.append(1)
        message.infer_response.raw_output_contents.append(len(text).to_bytes(4, "little") + text)
    return message.SerializeToString()


class ScriptedCall:
    """A StreamCall that sends ``messages`` then ends, or then waits forever (``hang``)."""

    def __init__(self, messages: list[bytes], hang: bool = False) -> None:
        self._messages = messages
        self._hang = hang
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._read()

    async def _read(self) -> AsyncIterator[bytes]:
        for message in self._messages:
            yield message
        if self._hang:
            await asyncio.Event().wait()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class ScriptedChannel:
    def __init__(self, call: ScriptedCall) -> None:
        self.call = call
        self.sent: list[bytes] = []

    async def stream(self, request: bytes, timeout: float, metadata: Any = ()) -> ScriptedCall:
        self.sent.append(request)
        return self.call


class ScriptedBackend:
    id = "scripted"

    def __init__(self, call: ScriptedCall) -> None:
        self.channel = ScriptedChannel(call)


REQUEST = pb.ModelInferRequest(model_name="tiny_lm", id="7").SerializeToString()


def replies_of(call: ScriptedCall, idle: float = 5.0, convert: Any = None) -> StreamReplies:
    backend = cast(Backend, ScriptedBackend(call))
    return StreamReplies(backend, REQUEST, Timeouts(30.0, idle), (), convert)


async def test_responses_in_order_without_the_empty_ones() -> None:
    call = ScriptedCall([response(b"a"), response(), response(b"b")])
    got = [reply.outputs[0][0] async for reply in replies_of(call)]
    assert got == ["text_output", "text_output"]


async def test_convert_shapes_each_response() -> None:
    call = ScriptedCall([response(b"a"), response(b"bc")])
    got = [n async for n in replies_of(call, convert=lambda reply: len(reply.outputs))]
    assert got == [1, 1]


async def test_the_call_opens_on_the_first_read_only() -> None:
    call = ScriptedCall([response(b"a")])
    replies = replies_of(call)
    backend = cast(Any, replies._backend)
    assert backend.channel.sent == []
    await anext(replies)
    assert len(backend.channel.sent) == 1


async def test_the_request_asks_for_a_final_flag_sent_alone() -> None:
    call = ScriptedCall([response(b"a")])
    replies = replies_of(call)
    await anext(replies)
    sent = pb.ModelInferRequest.FromString(cast(Any, replies._backend).channel.sent[0])
    assert (sent.model_name, sent.id) == ("tiny_lm", "7")
    assert sent.parameters["triton_enable_empty_final_response"].bool_param is True


@pytest.mark.parametrize(
    "messages",
    [
        [response(b"a", final=False), response(b"b", final=True)],
        [response(b"a", final=False), response(b"b", final=False), response(final=True)],
    ],
    ids=["final-with-text", "final-alone"],
)
async def test_the_response_marked_final_ends_the_replies(messages: list[bytes]) -> None:
    """Without waiting for the call's trailers (the scripted call never ends), and
    without resetting the call, which would cancel a finished request."""
    call = ScriptedCall(messages, hang=True)
    replies = replies_of(call, idle=5.0)
    got = [reply.outputs[0][0] async for reply in replies]
    assert got == ["text_output", "text_output"]
    await replies.aclose()
    assert not call.cancelled


@pytest.mark.parametrize(
    ("error", "raised"),
    [("bad input", UpstreamError), ("Request for unknown model: 'x' is not found", ModelGone)],
)
async def test_an_error_response_raises_and_cancels_the_call(
    error: str, raised: type[Exception]
) -> None:
    call = ScriptedCall([response(b"a"), response(error=error)])
    replies = replies_of(call)
    await anext(replies)
    with pytest.raises(raised):
        await anext(replies)
    assert call.cancelled


async def test_closing_early_cancels_the_call() -> None:
    call = ScriptedCall([response(b"a"), response(b"b")])
    replies = replies_of(call)
    await anext(replies)
    assert not call.cancelled
    await replies.aclose()
    assert call.cancelled


async def test_closing_before_the_first_read_opens_nothing() -> None:
    call = ScriptedCall([response(b"a")])
    replies = replies_of(call)
    await replies.aclose()
    assert cast(Any, replies._backend).channel.sent == []


async def test_a_gap_after_the_first_response_is_a_stall() -> None:
    call = ScriptedCall([response(b"a")], hang=True)
    replies = replies_of(call, idle=0.05)
    await anext(replies)
    with pytest.raises(UpstreamStalled, match=r"backend scripted for 0\.05 s"):
        await anext(replies)
    assert call.cancelled


async def test_a_cancelled_wait_cancels_the_call() -> None:
    """The client hung up while the gateway waited for the model's next token."""
    call = ScriptedCall([response(b"a")], hang=True)
    replies = replies_of(call)
    await anext(replies)
    waiting = asyncio.ensure_future(anext(replies))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert call.cancelled


async def test_nothing_but_the_reader_holds_a_response() -> None:
    """An async generator's suspended frame would hold its last response (and the
    buffers it views) until the next one; a stream's objects are walked by every full
    garbage collection."""
    call = ScriptedCall([response(b"a"), response(b"b")])
    replies = replies_of(call)
    reply = await anext(replies)
    # The local name and getrefcount's own argument.
    assert sys.getrefcount(reply) == 2
