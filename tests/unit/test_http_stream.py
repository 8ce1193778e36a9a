"""gateway.http_stream: generate_stream replies over pooled connections, against a real
HTTP server on a real socket that answers as Triton's HTTP endpoint does (chunked
Server-Sent Events, one event per chunk)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.errors import GatewayTimeout, UpstreamStalled
from gateway.http_stream import SseStream, StreamPool, StreamRefused
from gateway.http_upstream import UpstreamConnectFailed, UpstreamConnectionError
from tests.conftest import free_port

EVENTS = [b'data: {"text_output":" a"}\n\n', b'data: {"text_output":" b"}\n\n']


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


class FakeTriton:
    """Answers each POST with ``EVENTS`` as a chunked stream; counts connections and
    requests; can hold a reply, drop a kept-alive connection's next request, or split
    the reply's last bytes."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.closed_by_client = 0  # connections the client closed (EOF seen)
        self.hold: asyncio.Event | None = None  # wait for it after the first event
        self.first_after = 0.0  # seconds before the reply (Triton working on a first token)
        self.end_after = 0.0  # seconds between the last event and the reply's end
        self.drop_reused = False  # close a connection on its second request, unanswered
        self.split_terminator = False  # the final CRLF in a write of its own
        self.keep_alive = True
        self.refuse = False
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        served = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                self.requests += 1
                served += 1
                if self.drop_reused and served > 1:
                    return  # as Triton closing an idle connection as the request arrives
                if self.refuse:
                    body = b'{"error":"no such model"}'
                    writer.write(
                        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body
                    )
                    await writer.drain()
                    continue
                await asyncio.sleep(self.first_after)
                close = b"" if self.keep_alive else b"Connection: close\r\n"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    + close
                    + b"Transfer-Encoding: chunked\r\n\r\n"
                    + chunk(EVENTS[0])
                )
                await writer.drain()
                if self.hold is not None:
                    await self.hold.wait()
                    if await _peer_closed(reader):
                        self.closed_by_client += 1
                        return
                writer.write(chunk(EVENTS[1]) + (b"0\r\n" if self.split_terminator else b""))
                await writer.drain()
                await asyncio.sleep(self.end_after)
                if self.split_terminator:
                    await asyncio.sleep(0.05)
                    writer.write(b"\r\n")
                else:
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
                if not self.keep_alive:
                    return
        finally:
            writer.close()


async def _peer_closed(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(0.2):
            return await reader.read(1) == b""
    except TimeoutError:
        return False


@pytest.fixture
async def triton() -> AsyncIterator[tuple[FakeTriton, StreamPool]]:
    fake = FakeTriton()
    port = free_port()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", port)
    pool = StreamPool(f"127.0.0.1:{port}")
    yield fake, pool
    pool.close()
    server.close()
    for writer in fake.writers:
        writer.close()


async def open_stream(pool: StreamPool, timeout: float = 5.0, idle: float = 5.0) -> SseStream:
    deadline = asyncio.get_running_loop().time() + timeout
    return await pool.open("b0", "/v2/models/m/generate_stream", [], b"{}", idle, deadline)


async def read_all(stream: SseStream) -> list[bytes]:
    assert (await stream.head())[0] == 200
    events = []
    while (event := await stream.next_event()) is not None:
        events.append(event)
    return events


async def until(condition: object, what: str) -> None:
    for _ in range(200):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_stream_read_to_its_end_leaves_its_connection_for_the_next(
    triton: tuple[FakeTriton, StreamPool],
) -> None:
    fake, pool = triton
    for _ in range(3):
        stream = await open_stream(pool)
        assert await read_all(stream) == EVENTS
        stream.close()
        assert pool.idle_count == 1
    assert (fake.connections, fake.requests) == (1, 3)


async def test_relayed_streams_reuse_the_connection_too(
    triton: tuple[FakeTriton, StreamPool],
) -> None:
    fake, pool = triton
    for _ in range(2):
        stream = await open_stream(pool)
        await stream.head()
        relayed: list[bytes] = [e for e in [await stream.next_event()] if e is not None]
        await stream.relay(relayed.append)
        stream.close()
        assert relayed == EVENTS
    assert fake.connections == 1


async def test_an_abandoned_stream_closes_its_connection(
    triton: tuple[FakeTriton, StreamPool],
) -> None:
    fake, pool = triton
    fake.hold = asyncio.Event()
    stream = await open_stream(pool)
    await stream.head()
    assert await stream.next_event() == EVENTS[0]
    stream.close()  # the client went away mid-stream: Triton must see the connection go
    assert pool.idle_count == 0
    assert stream.transport is not None and stream.transport.is_closing()
    fake.hold.set()
    await until(lambda: fake.closed_by_client == 1, "Triton to see the connection closed")
    fake.hold = None
    assert await read_all(await open_stream(pool)) == EVENTS
    assert fake.connections == 2


async def test_a_cancelled_reader_closes_its_connection(
    triton: tuple[FakeTriton, StreamPool],
) -> None:
    fake, pool = triton
    fake.hold = asyncio.Event()
    stream = await open_stream(pool)

    async def consume() -> None:
        try:
            await read_all(stream)
        finally:
            stream.close()

    task = asyncio.create_task(consume())
    await until(lambda: stream._events or stream._last_event, "the first event")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.idle_count == 0
    fake.hold.set()
    await until(lambda: fake.closed_by_client == 1, "Triton to see the connection closed")
    assert pool.idle_count == 0


async def test_a_stale_pooled_connection_falls_back_to_a_fresh_one(
    triton: tuple[FakeTriton, StreamPool],
) -> None:
    fake, pool = triton
    fake.drop_reused = True
    first = await open_stream(pool)
    assert await read_all(first) == EVENTS
    first.close()
    assert pool.idle_count == 1
    # Triton closes the pooled connection as the next request arrives on it.
    second = await open_stream(pool)
    assert second.reused
    assert await read_all(second) == EVENTS
    second.close()
    assert (fake.connections, fake.requests) == (2, 3)
    assert pool.idle_count == 1


async def test_an_idle_connection_closed_by_triton_leaves_the_pool(
    triton: tuple[FakeTriton, StreamPool],
) -> None:
    fake, pool = triton
    stream = await open_stream(pool)
    await read_all(stream)
    stream.close()
    assert pool.idle_count == 1
    fake.writers[0].close()
    await until(lambda: pool.idle_count == 0, "the pool to drop the closed connection")
    assert await read_all(await open_stream(pool)) == EVENTS
    assert fake.connections == 2


async def test_a_failure_after_reply_bytes_is_not_retried(
    triton: tuple[FakeTriton, StreamPool],
) -> None:
    fake, pool = triton
    fake.hold = asyncio.Event()
    first = await open_stream(pool)
    await read_all_after_release(first, fake.hold)
    first.close()
    fake.hold = asyncio.Event()
    second = await open_stream(pool)
    await second.head()
    assert await second.next_event() == EVENTS[0]
    fake.writers[0].close()  # the connection breaks mid-stream
    with pytest.raises(UpstreamConnectionError):
        await second.next_event()
    second.close()
    assert (fake.connections, fake.requests) == (1, 2)


async def read_all_after_release(stream: SseStream, hold: asyncio.Event) -> None:
    await stream.head()
    assert await stream.next_event() == EVENTS[0]
    hold.set()
    assert await stream.next_event() == EVENTS[1]
    assert await stream.next_event() is None


async def test_connection_close_replies_are_not_pooled(
    triton: tuple[FakeTriton, StreamPool],
) -> None:
    fake, pool = triton
    fake.keep_alive = False
    for _ in range(2):
        stream = await open_stream(pool)
        assert await read_all(stream) == EVENTS
        stream.close()
        assert pool.idle_count == 0
    assert fake.connections == 2


async def test_a_reply_not_yet_read_to_its_last_byte_is_not_pooled(
    triton: tuple[FakeTriton, StreamPool],
) -> None:
    fake, pool = triton
    fake.split_terminator = True
    stream = await open_stream(pool)
    assert await read_all(stream) == EVENTS  # ends at the last chunk, before its CRLF
    stream.close()
    assert pool.idle_count == 0
    assert await read_all(await open_stream(pool)) == EVENTS
    assert fake.connections == 2


async def test_refusals_raise_and_close(triton: tuple[FakeTriton, StreamPool]) -> None:
    fake, pool = triton
    fake.refuse = True
    stream = await open_stream(pool)
    with pytest.raises(StreamRefused) as refused:
        await stream.head()
    stream.close()
    assert (refused.value.status, refused.value.body) == (404, b'{"error":"no such model"}')
    assert pool.idle_count == 0


async def test_the_idle_pool_is_bounded(triton: tuple[FakeTriton, StreamPool]) -> None:
    fake, pool = triton
    pool = StreamPool(pool.endpoint.target, max_idle=2)
    streams = [await open_stream(pool) for _ in range(4)]
    for stream in streams:
        assert await read_all(stream) == EVENTS
        stream.close()
    assert (pool.idle_count, fake.connections) == (2, 4)
    pool.close()
    assert pool.idle_count == 0


@pytest.mark.parametrize(
    ("timeout", "idle", "raised", "message"),
    [
        (0.2, 5.0, GatewayTimeout, "request deadline exceeded"),
        (5.0, 0.1, UpstreamStalled, r"no response from backend b0 for 0\.1 s"),
    ],
    ids=["the deadline", "a gap after an event"],
)
async def test_a_time_limit_cuts_a_stream_and_its_connection(
    triton: tuple[FakeTriton, StreamPool],
    timeout: float,
    idle: float,
    raised: type[Exception],
    message: str,
) -> None:
    fake, pool = triton
    fake.hold = asyncio.Event()
    stream = await open_stream(pool, timeout=timeout, idle=idle)
    await stream.head()
    assert await stream.next_event() == EVENTS[0]
    with pytest.raises(raised, match=message):
        await stream.next_event()
    stream.close()
    assert pool.idle_count == 0
    fake.hold.set()


async def test_a_relayed_stream_stalls_too(triton: tuple[FakeTriton, StreamPool]) -> None:
    fake, pool = triton
    fake.hold = asyncio.Event()
    stream = await open_stream(pool, idle=0.1)
    await stream.head()
    assert await stream.next_event() == EVENTS[0]
    relayed: list[bytes] = []
    with pytest.raises(UpstreamStalled):
        await stream.relay(relayed.append)
    assert relayed == []
    stream.close()
    fake.hold.set()


async def test_the_idle_timeout_waits_for_the_first_event(
    triton: tuple[FakeTriton, StreamPool],
) -> None:
    """Before its first event a request may queue at Triton: only the deadline bounds it."""
    fake, pool = triton
    fake.first_after = 0.3
    stream = await open_stream(pool, idle=0.05)
    assert await read_all(stream) == EVENTS


async def test_an_event_in_time_keeps_the_stream_alive(
    triton: tuple[FakeTriton, StreamPool],
) -> None:
    """The timer fires when the idle timeout would have run out since the first event;
    an event came since, so it moves on to the timeout from that event."""
    fake, pool = triton
    fake.hold = asyncio.Event()
    fake.end_after = 0.85  # the reply ends ~0.15 s after that first expiry
    stream = await open_stream(pool, idle=1.0)
    await stream.head()
    assert await stream.next_event() == EVENTS[0]
    asyncio.get_running_loop().call_later(0.1, fake.hold.set)  # the next event at ~0.3 s
    assert await stream.next_event() == EVENTS[1]
    assert await stream.next_event() is None
    stream.close()


async def test_no_server_is_a_connect_failure() -> None:
    pool = StreamPool(f"127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamConnectFailed):
        await open_stream(pool)
