"""The event loop's own gRPC client (gateway/grpc_h2.py) against grpc's own server.

The server is grpc.aio's, so the framing, flow control, trailers, deadlines and resets
are checked against the gRPC implementation Triton itself is built on (C-core).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import hpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import grpc_h2
from gateway.grpc_h2 import (
    H2Channel,
    HeaderDecoder,
    _Connection,
    _only_indexed,
    grpc_timeout,
    hpack_literals,
)
from tests.conftest import free_port

SERVICE = "inference.GRPCInferenceService"
STREAM = f"/{SERVICE}/ModelStreamInfer".encode()
UNARY = f"/{SERVICE}/ModelInfer".encode()
LIMIT = 8 << 20


class Peer:
    """A grpc.aio server: ModelInfer echoes (or sleeps, or fails, as the request says),
    ModelStreamInfer answers one request with as many copies as its first byte says."""

    def __init__(self, max_streams: int | None = None) -> None:
        self.port = free_port()
        self.metadata: list[tuple[str, str]] = []
        self.cancelled = asyncio.Event()
        self.server: grpc.aio.Server | None = None
        self.options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", LIMIT),
            ("grpc.max_send_message_length", LIMIT),
        ]
        if max_streams is not None:
            self.options.append(("grpc.max_concurrent_streams", max_streams))

    async def start(self) -> None:
        self.server = grpc.aio.server(options=self.options)
        handlers = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.unary),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.stream),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop(grace=None)

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.metadata = [(m.key, m.value) for m in context.invocation_metadata() or ()]
        if request.startswith(b"sleep"):
            try:
                await asyncio.sleep(float(request[5:].partition(b"-")[0]))
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request.startswith(b"fail"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request[4:].decode())
        return request

    async def stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            for i in range(request[0]):
                yield bytes([i]) + request[1:]
                await asyncio.sleep(0)


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    server = Peer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def channel(peer: Peer) -> AsyncIterator[H2Channel]:
    client = H2Channel(f"127.0.0.1:{peer.port}", LIMIT)
    yield client
    client.close()


async def replies(channel: H2Channel, request: bytes, timeout: float = 5.0) -> list[bytes]:
    return [m async for m in await channel.call(STREAM, request, timeout, ())]


async def test_stream_replies_in_order(channel: H2Channel) -> None:
    assert await replies(channel, bytes([3]) + b"abc") == [b"\x00abc", b"\x01abc", b"\x02abc"]
    assert await replies(channel, bytes([0])) == []  # no replies, status OK


async def test_unary_round_trip_with_metadata(channel: H2Channel, peer: Peer) -> None:
    call = await channel.call(UNARY, b"hello", 5.0, [("traceparent", "00-abc-def-01")])
    assert await call.reply() == b"hello"
    assert ("traceparent", "00-abc-def-01") in peer.metadata


async def test_large_messages_both_ways(channel: H2Channel) -> None:
    # Larger than every flow-control window and frame: both sides must wait and split.
    body = bytes(range(256)) * (4 << 12)  # 4 MiB
    assert await (await channel.call(UNARY, body, 10.0, ())).reply() == body


async def test_dead_peers_are_given_up_on_by_the_kernel(channel: H2Channel) -> None:
    call = await channel.call(UNARY, b"x", 5.0, ())
    assert await call.reply() == b"x"
    transport = call._connection._transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 40_000


async def test_many_calls_share_one_connection(channel: H2Channel) -> None:
    bodies = [f"call {i}".encode() for i in range(64)]
    calls = [await channel.call(UNARY, body, 5.0, ()) for body in bodies]
    assert await asyncio.gather(*(c.reply() for c in calls)) == bodies


async def test_calls_beyond_the_servers_stream_limit_open_more_connections() -> None:
    peer = Peer(max_streams=2)
    await peer.start()
    channel = H2Channel(f"127.0.0.1:{peer.port}", LIMIT)
    try:
        await (await channel.call(UNARY, b"x", 5.0, ())).reply()  # Triton's SETTINGS known
        calls = [await channel.call(UNARY, f"sleep0.3-{i}".encode(), 5.0, ()) for i in range(5)]
        replies = await asyncio.gather(*(c.reply() for c in calls))
        assert replies == [f"sleep0.3-{i}".encode() for i in range(5)]
        assert len({id(c._connection) for c in calls}) == 3  # 2 + 2 + 1 streams
    finally:
        channel.close()
        await peer.stop()


async def test_server_status_and_message(channel: H2Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await (await channel.call(UNARY, "fail100% wrong: ünïcode".encode(), 5.0, ())).reply()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "100% wrong: ünïcode"
    assert await (await channel.call(UNARY, b"still serving", 5.0, ())).reply() == b"still serving"


async def test_deadline(channel: H2Channel, peer: Peer) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await (await channel.call(UNARY, b"sleep5", 0.2, ())).reply()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert loop.time() - started < 2.0
    await asyncio.wait_for(peer.cancelled.wait(), 5.0)  # the server stopped the handler


async def test_cancel_stops_the_server_side(channel: H2Channel, peer: Peer) -> None:
    call = await channel.call(UNARY, b"sleep5", 10.0, ())
    await asyncio.sleep(0.1)
    assert call.cancel()
    assert not call.cancel()  # once
    await asyncio.wait_for(peer.cancelled.wait(), 5.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.reply()
    assert caught.value.code() == grpc.StatusCode.CANCELLED


async def test_waiting_task_cancelled_cancels_the_call(channel: H2Channel, peer: Peer) -> None:
    task = asyncio.ensure_future((await channel.call(UNARY, b"sleep5", 10.0, ())).reply())
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.wait_for(peer.cancelled.wait(), 5.0)


async def test_message_over_the_limit(peer: Peer) -> None:
    small = H2Channel(f"127.0.0.1:{peer.port}", 1000)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as sent:
            await small.call(UNARY, bytes(1001), 5.0, ())
        assert sent.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # A reply over the limit: the stream answers its request 2 times, 999 bytes each.
        with pytest.raises(grpc.aio.AioRpcError) as received:
            await replies(small, bytes([2]) + bytes(1500))
        assert received.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        small.close()


async def test_unreachable_is_unavailable() -> None:
    nowhere = H2Channel(f"127.0.0.1:{free_port()}", LIMIT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await nowhere.call(UNARY, b"x", 5.0, ())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_server_that_never_speaks_http2_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(grpc_h2, "CONNECT_TIMEOUT_S", 0.2)
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accepts, reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = H2Channel(f"127.0.0.1:{port}", LIMIT)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.call(UNARY, b"x", 5.0, ())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not answer HTTP/2" in str(caught.value.details())
    finally:
        channel.close()
        for writer in accepted:
            writer.close()
        server.close()


async def test_server_gone_mid_call_then_back(peer: Peer) -> None:
    channel = H2Channel(f"127.0.0.1:{peer.port}", LIMIT)
    try:
        call = await channel.call(UNARY, b"sleep5", 10.0, ())
        await asyncio.sleep(0.1)
        await peer.stop()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.reply()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        await peer.start()  # the same port: the next call opens a new connection
        assert await (await channel.call(UNARY, b"back", 5.0, ())).reply() == b"back"
    finally:
        channel.close()


def test_grpc_timeout_header() -> None:
    assert grpc_timeout(0.0001) == b"1m"
    assert grpc_timeout(1.5) == b"1500m"
    assert grpc_timeout(99_999.999) == b"99999999m"
    assert grpc_timeout(200_000.0) == b"200000S"


_names = st.binary(min_size=1, max_size=300).map(bytes.lower)


@given(st.lists(st.tuples(_names, st.binary(max_size=5000)), max_size=12))
def test_hpack_literals_decode_to_the_headers(headers: list[tuple[bytes, bytes]]) -> None:
    decoder: Any = hpack.Decoder()
    decoder.max_header_list_size = 1 << 30
    decoded = decoder.decode(hpack_literals(headers), raw=True)
    assert [(bytes(n), bytes(v)) for n, v in decoded] == headers
    assert len(decoder.header_table.dynamic_entries) == 0  # nothing indexed


# Header lists a server might send, a few values each, so that blocks repeat, fields
# come from the dynamic table and the table's entries move and are evicted.
_replies = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from([b":status", b"content-type", b"grpc-status", b"x-a", b"x-b"]),
            st.sampled_from([b"200", b"0", b"application/grpc", b"1", b"2" * 40]),
        ),
        min_size=1,
        max_size=4,
    ),
    max_size=40,
)


@given(_replies, st.sampled_from([64, 256, 4096]))
def test_the_remembering_decoder_decodes_as_hpack_does(
    replies: list[list[tuple[bytes, bytes]]], table_size: int
) -> None:
    """Whatever the sequence of blocks, including ones that only index a dynamic table
    that changed since they were first seen (a small table evicts often)."""
    encoder = hpack.Encoder()
    encoder.header_table_size = table_size
    plain, remembering = hpack.Decoder(), HeaderDecoder()
    for headers in replies:
        block = encoder.encode(headers)
        assert remembering.decode(block) == list(plain.decode(block, raw=True)) == headers


def test_a_block_of_indexed_fields_is_decoded_once() -> None:
    encoder, decoder = hpack.Encoder(), HeaderDecoder()
    headers = [(b":status", b"200"), (b"x-a", b"1")]
    literal = encoder.encode(headers)
    assert not _only_indexed(literal)
    assert decoder.decode(literal) == headers  # x-a: 1 enters the dynamic table
    block = encoder.encode(headers)
    assert block == b"\x88\xbe" and _only_indexed(block)
    first = decoder.decode(block)
    assert first == headers
    assert decoder.decode(block) is first


@pytest.mark.parametrize(
    ("block", "indexed"),
    [
        (b"", True),
        (b"\x88\xc0\xbf", True),
        (b"\xff\x80\x01\x82", True),  # index 127 + 128 as a multi-byte integer, then 2
        (b"\x88\x40\x01a\x01b", False),  # a literal with indexing
        (b"\x20\x88", False),  # a table size update
        (b"\x88\x0f\x10\x01b", False),  # a literal without indexing
    ],
)
def test_only_indexed(block: bytes, indexed: bool) -> None:
    assert _only_indexed(block) is indexed


class Transport:
    """Collects what the client writes; the test plays Triton's side by hand."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket


@contextlib.contextmanager
def played_connection() -> Iterator[tuple[_Connection, Transport]]:
    """A client connection whose Triton side the test plays by hand (its own loop, not
    run: a Hypothesis test cannot take a function-scoped fixture)."""
    loop = asyncio.new_event_loop()
    try:
        connection = _Connection(loop, LIMIT)
        transport = Transport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        yield connection, transport
    finally:
        loop.close()


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def sent_frames(written: bytes) -> list[tuple[int, int, int]]:
    """(type, flags, stream id) of each frame the client wrote after its preface."""
    frames, position = [], len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    while position < len(written):
        length = int.from_bytes(written[position : position + 3], "big")
        kind, flags = written[position + 3], written[position + 4]
        frames.append((kind, flags, int.from_bytes(written[position + 5 : position + 9], "big")))
        position += 9 + length
    return frames


def grpc_messages(*messages: bytes) -> bytes:
    return b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in messages)


@given(
    st.lists(st.binary(max_size=3000), max_size=6),
    st.integers(1, 4000),
    st.lists(st.integers(1, 500), min_size=1, max_size=40),
    st.sampled_from([0, 3, 5]),
)
def test_frames_split_anywhere(
    messages: list[bytes], frame_size: int, cuts: list[int], status: int
) -> None:
    """Two calls' answers, interleaved and padded frames, Huffman-coded header blocks with
    a dynamic table, a header block continued, all delivered in arbitrary pieces: each
    call gets its messages in order and its status."""
    with played_connection() as (connection, transport):
        first = connection.start(STREAM, [], b"a")
        second = connection.start(STREAM, [], b"b")
        encoder = hpack.Encoder()
        body = grpc_messages(*messages)
        chunks = [body[i : i + frame_size] for i in range(0, len(body), frame_size)]
        trailers = [(b"grpc-status", str(status).encode()), (b"grpc-message", b"gone%20wrong")]
        head = [(b":status", b"200"), (b"content-type", b"application/grpc")]
        wire = frame(4, 0, 0, b"")  # Triton's SETTINGS
        for stream_id in (first._stream_id, second._stream_id):
            wire += frame(1, 0x4, stream_id, encoder.encode(head))  # the second: indexed
        for chunk in chunks:
            padded = bytes((3,)) + chunk + b"\x00\x00\x00"
            wire += frame(0, 0x8, first._stream_id, padded)
            wire += frame(0, 0, second._stream_id, chunk)
        block = encoder.encode(trailers)  # continued in a CONTINUATION frame
        wire += frame(1, 0x1, first._stream_id, block[:2])
        wire += frame(9, 0x4, first._stream_id, block[2:])
        wire += frame(1, 0x5, second._stream_id, encoder.encode(trailers))
        position = 0
        for cut in cuts * (len(wire) // sum(cuts) + 1):
            if position >= len(wire):
                break
            connection.data_received(wire[position : position + cut])
            position += cut
        for call in (first, second):
            assert list(call._messages) == messages
            assert call._ended
            if status:
                assert call._error is not None and call._error.code().value[0] == status
                assert call._error.details() == "gone wrong"
            else:
                assert call._error is None
        assert not transport.closed
        assert sent_frames(transport.written).count((4, 0x1, 0)) == 1  # SETTINGS acknowledged


def test_a_broken_connection_fails_its_calls_and_closes() -> None:
    with played_connection() as (connection, transport):
        call = connection.start(STREAM, [], b"a")
        connection.data_received(frame(1, 0x4, call._stream_id, b"\xff\xff\xff\xff"))  # bad HPACK
        assert call._error is not None
        assert call._error.code() == grpc.StatusCode.UNAVAILABLE
        assert transport.closed and not connection.usable
