"""Backends found by DNS join and leave while clients stream, with no failed request.

DNS gives addresses, not ports, and the session's two Tritons share 127.0.0.1 (they
bind that address only), so the injected resolver answers SRV-style (address, port)
pairs: the name resolves to the servers' gRPC ports, and ``metrics_port``/``http_port``
keep their distance from it (see ``DnsBackendSpec.backend``). The gateway runs in this
process because a resolver is a callable; clients reach it over real sockets, and it
reaches the real Tritons over gRPC.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from fastpath.state import INFLIGHT
from gateway.api.keys import FLEET
from gateway.app import create_app
from gateway.config import DnsBackendSpec, GatewayConfig
from gateway.local_triton import TritonFleet, TritonServer
from tests.conftest import free_port

pytestmark = pytest.mark.e2e

NAME = "triton-e2e"
MODEL = "tiny_lm"
TOKENS = 20  # ~0.1 s per request at 5 ms per token: streams are mid-flight at any moment
CLIENTS = 4
MAX_REQUESTS = 2000  # the client loop's bound; the phases below need far fewer
PHASE_TIMEOUT_S = 60.0


@dataclass
class Load:
    """A bounded loop of CLIENTS concurrent streaming clients, counting outcomes."""

    url: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._client(session) for _ in range(CLIENTS)))

    async def _client(self, session: aiohttp.ClientSession) -> None:
        body = {"text_input": "We the People", "max_tokens": TOKENS, "stream": True}
        while not self.stop.is_set() and self.sent < MAX_REQUESTS:
            self.sent += 1
            try:
                async with session.post(
                    f"{self.url}/v2/models/{MODEL}/generate_stream", json=body
                ) as reply:
                    text = await reply.text()
            except aiohttp.ClientError as exc:
                self.failures.append(repr(exc))
                continue
            events = [json.loads(e[len("data: ") :]) for e in text.split("\n\n") if e]
            if reply.status != 200 or len(events) != TOKENS or any("error" in e for e in events):
                self.failures.append(f"{reply.status}: {text[:300]}")
            else:
                self.ok += 1


async def until(condition: Callable[[], bool], what: str, load: Load) -> None:
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        assert not load.failures, load.failures[:3]
        await asyncio.sleep(0.02)


async def test_backends_join_and_leave_without_failed_requests(triton_fleet: TritonFleet) -> None:
    first, second = triton_fleet.servers
    name = DnsBackendSpec(
        NAME, first.grpc_port, metrics_port=first.metrics_port, http_port=first.http_port
    )
    answer = [first]

    async def resolver(host: str, port: int) -> list[tuple[str, int]]:
        assert (host, port) == (NAME, first.grpc_port)
        return [("127.0.0.1", server.grpc_port) for server in answer]

    def backend_id(server: TritonServer) -> str:
        return name.backend("127.0.0.1", server.grpc_port).id

    config = GatewayConfig(
        port=free_port(),
        dns_backends=(name,),
        resolver=resolver,
        dns_interval_s=0.2,
        discovery_interval_s=0.5,
    )
    app = create_app(config)
    fleet = app[FLEET]
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", config.port).start()

    def slot(server: TritonServer) -> int:
        return fleet.state.slot(backend_id(server), MODEL)

    def served(server: TritonServer) -> bool:
        return backend_id(server) in fleet.by_id and bool(
            fleet.state.describe_slot(slot(server), time.monotonic())["ttft_ewma_s"]
        )

    load = Load(f"http://127.0.0.1:{config.port}")
    clients = asyncio.create_task(load.run())
    try:
        assert list(fleet.by_id) == [backend_id(first)]
        await until(lambda: load.ok >= 10, "the first server served", load)

        answer = [first, second]  # scale out: the second server joins
        await until(lambda: served(second), "the joined server served a stream", load)

        # Scale in while streams are in flight on the first server: it drains, then leaves.
        await until(lambda: fleet.state.array[slot(first), INFLIGHT] > 0, "streams on it", load)
        answer = [second]
        await until(lambda: backend_id(first) not in fleet.by_id, "the first server left", load)
        left_at = load.ok
        await until(lambda: load.ok >= left_at + 10, "the rest served after it left", load)
    finally:
        load.stop.set()
        await clients
        await runner.cleanup()
    assert load.failures == []
    assert [b.id for b in fleet.backends] == [backend_id(second)]
