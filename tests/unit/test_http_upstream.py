"""The keep-alive HTTP/1.1 pool that forwards unary infer to Triton's HTTP endpoint."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from gateway.http1 import PREALLOCATE_BYTES
from gateway.http_upstream import (
    HttpPool,
    UpstreamConnectFailed,
    UpstreamConnectionError,
    _Connection,
)
from tests.conftest import free_port


class EchoServer:
    """Answers each request with its body; counts connections; can misbehave."""

    def __init__(self) -> None:
        self.connections = 0
        self.close_after_reply = False
        self.delay = 0.0
        self.pieces = 1  # the reply written in this many parts, each sent on its own
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                await asyncio.sleep(self.delay)
                extra = b"Connection: close\r\n" if self.close_after_reply else b""
                reply = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    + extra
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                step = -(-len(reply) // self.pieces)
                for at in range(0, len(reply), step):
                    writer.write(reply[at : at + step])
                    await writer.drain()
                    if self.pieces > 1:
                        await asyncio.sleep(0.01)  # each part its own read at the pool
                if self.close_after_reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[tuple[EchoServer, str]]:
    echo = EchoServer()
    port = free_port()
    srv = await asyncio.start_server(echo.handle, "127.0.0.1", port)
    yield echo, f"127.0.0.1:{port}"
    srv.close()
    for writer in echo.writers:
        writer.close()


async def test_replies_and_reuses_the_connection(server: tuple[EchoServer, str]) -> None:
    echo, target = server
    pool = HttpPool(target)
    for payload in (b"first", b"x" * 300_000, b""):
        reply = await pool.post("/v2/models/m/infer", [("Content-Type", "a/b")], payload, 5)
        assert (reply.status, reply.body) == (200, payload)
        assert reply.headers[b"content-type"] == b"application/octet-stream"
    assert echo.connections == 1
    pool.close()


async def test_connection_close_reply_opens_a_new_connection(
    server: tuple[EchoServer, str],
) -> None:
    echo, target = server
    echo.close_after_reply = True
    pool = HttpPool(target)
    for _ in range(3):
        assert (await pool.post("/p", [], b"abc", 5)).body == b"abc"
    assert echo.connections == 3
    pool.close()


async def test_idle_connection_closed_by_server_is_replaced(server: tuple[EchoServer, str]) -> None:
    echo, target = server
    pool = HttpPool(target)
    assert (await pool.post("/p", [], b"one", 5)).body == b"one"
    for writer in echo.writers:  # the server drops its idle keep-alive connection
        writer.close()
    await asyncio.sleep(0.05)
    assert (await pool.post("/p", [], b"two", 5)).body == b"two"
    assert echo.connections == 2
    pool.close()


async def test_requests_started_together_are_written_together(
    server: tuple[EchoServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Triton batches what is queued when its model instance frees up: the requests
    that start in one loop iteration are written at its end, in order, together."""
    _echo, target = server
    pool = HttpPool(target)
    await asyncio.gather(*(pool.post("/v2/models/m/infer", [], b"warm", 5) for _ in range(2)))
    events: list[tuple[str, bytes]] = []
    write = _Connection.write

    def recorded_write(self: _Connection, head: bytes, body: bytes | bytearray) -> None:
        events.append(("write", bytes(body)))
        write(self, head, body)

    monkeypatch.setattr(_Connection, "write", recorded_write)

    async def post(body: bytes) -> bytes | bytearray:
        events.append(("start", body))
        return (await pool.post("/v2/models/m/infer", [], body, 5)).body

    assert await asyncio.gather(post(b"a"), post(b"b")) == [b"a", b"b"]
    assert events == [("start", b"a"), ("start", b"b"), ("write", b"a"), ("write", b"b")]
    pool.close()


async def test_refused_connection_is_a_connect_failure() -> None:
    """Not reached at all (failover counts it as unreachable, not as failed mid-call)."""
    pool = HttpPool(f"127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamConnectFailed, match=r"cannot connect to 127\.0\.0\.1:"):
        await pool.post("/p", [], b"x", 5)


async def test_timeout_discards_the_connection(server: tuple[EchoServer, str]) -> None:
    echo, target = server
    pool = HttpPool(target)
    echo.delay = 0.5
    with pytest.raises(TimeoutError):
        await pool.post("/p", [], b"slow", 0.05)
    echo.delay = 0.0
    # The timed-out exchange's reply must never be read as the next request's.
    assert (await pool.post("/p", [], b"next", 5)).body == b"next"
    assert echo.connections == 2
    pool.close()


async def test_a_shorter_deadline_than_the_pending_ones_still_times_out(
    server: tuple[EchoServer, str],
) -> None:
    # The pool's one deadline timer is set for the earliest deadline: a request with a
    # short timeout, sent while a long one is pending, must not wait for the long one's.
    echo, target = server
    pool = HttpPool(target)
    echo.delay = 0.5
    long = asyncio.create_task(pool.post("/p", [], b"long", 30))
    await asyncio.sleep(0.01)
    with pytest.raises(TimeoutError):
        await pool.post("/p", [], b"short", 0.05)
    assert not long.done()
    assert (await long).body == b"long"
    pool.close()


@pytest.mark.parametrize("pieces", [1, 2, 7, 40])
async def test_a_reply_read_in_parts_is_the_same_reply(
    server: tuple[EchoServer, str], pieces: int
) -> None:
    """One read (the pool's shortcut) or many (head and body split anywhere)."""
    echo, target = server
    echo.pieces = pieces
    pool = HttpPool(target)
    for body in (b"x" * 100, b"second"):
        reply = await pool.post("/echo", [], body, timeout=5)
        assert (reply.status, bytes(reply.body)) == (200, body)
        assert reply.headers[b"content-type"] == b"application/octet-stream"
    assert echo.connections == 1
    pool.close()


# A large reply is received by gateway.http1.BodyReceiver, which takes the transport over
# from the connection's protocol; the gateway's loop (uvloop) and asyncio's each switch
# protocols their own way.
LOOPS = [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(uvloop.new_event_loop, id="uvloop"),
]


def run_on(
    new_loop: Callable[[], asyncio.AbstractEventLoop], scenario: Coroutine[Any, Any, None]
) -> None:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(scenario)


@pytest.mark.parametrize("new_loop", LOOPS)
@pytest.mark.parametrize("pieces", [1, 9])
def test_a_large_reply_arrives_whole_and_the_connection_serves_on(
    new_loop: Callable[[], asyncio.AbstractEventLoop], pieces: int
) -> None:
    async def scenario() -> None:
        echo = EchoServer()
        echo.pieces = pieces
        port = free_port()
        server = await asyncio.start_server(echo.handle, "127.0.0.1", port)
        pool = HttpPool(f"127.0.0.1:{port}")
        try:
            for body in (os.urandom(3 << 20), b"small", os.urandom(PREALLOCATE_BYTES + 1)):
                reply = await pool.post("/echo", [], body, timeout=10)
                assert (reply.status, reply.body) == (200, body)
            assert echo.connections == 1
        finally:
            pool.close()
            server.close()

    run_on(new_loop, scenario())


@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_connection_lost_in_a_large_reply_fails_the_request(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def half_a_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 300_000)
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        port = free_port()
        server = await asyncio.start_server(half_a_reply, "127.0.0.1", port)
        pool = HttpPool(f"127.0.0.1:{port}")
        try:
            with pytest.raises(UpstreamConnectionError, match="connection lost"):
                await pool.post("/echo", [], b"{}", timeout=10)
        finally:
            pool.close()
            server.close()

    run_on(new_loop, scenario())
