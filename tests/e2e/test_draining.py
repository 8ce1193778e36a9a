"""SIGTERM drains: no new connections, in-flight streams finish, exit code 0."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import pytest

from gateway.local_triton import TritonFleet
from tests.e2e.conftest import start_gateway, stop_gateway

pytestmark = pytest.mark.e2e

TOKENS = 120  # ~0.6 s of tiny_lm at 5 ms per token: long enough to be mid-stream


async def test_sigterm_lets_streams_finish(triton_fleet: TritonFleet, run_dir: Path) -> None:
    backends = [s.backend_url for s in triton_fleet.servers]
    gw = start_gateway(backends, run_dir / "drain-gateway.log", "--drain-timeout", "20")
    try:
        body = {"text_input": "We the People", "max_tokens": TOKENS, "stream": True}
        events = []
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.url + "/v2/models/tiny_lm/generate_stream", json=body) as r:
                async for line in r.content:
                    if not line.startswith(b"data: "):
                        continue
                    events.append(json.loads(line[len(b"data: ") :]))
                    if len(events) == 3:
                        gw.process.send_signal(signal.SIGTERM)
                        await asyncio.sleep(0.2)
                        # The listener is closed: a new connection is refused.
                        with pytest.raises(aiohttp.ClientConnectorError):
                            async with aiohttp.ClientSession() as fresh:
                                await fresh.get(gw.url + "/v2/health/live")
        assert not any("error" in e for e in events)
        assert sum(1 for e in events if e.get("text_output")) == TOKENS
        assert events[-1]["finish_reason"] == "length"
        assert await asyncio.to_thread(gw.process.wait, 20) == 0
    finally:
        stop_gateway(gw)


async def test_sigterm_lets_fast_lane_requests_finish(
    triton_fleet: TritonFleet, run_dir: Path
) -> None:
    """A unary request on the fast lane finishes after SIGTERM and its connection closes;
    an idle kept-alive connection is closed at once."""
    backends = [s.backend_url for s in triton_fleet.servers]
    gw = start_gateway(backends, run_dir / "drain-fast-gateway.log", "--drain-timeout", "20")
    try:
        body = {"text_input": "We the People", "max_tokens": TOKENS}
        async with aiohttp.ClientSession() as busy, aiohttp.ClientSession() as idle:
            async with idle.get(gw.url + "/v2/health/ready") as r:  # now kept alive, idle
                assert r.status == 200 and "Server" not in r.headers
            request = asyncio.create_task(
                busy.post(gw.url + "/v2/models/tiny_lm/generate", json=body)
            )
            await asyncio.sleep(0.2)  # the generation is under way
            gw.process.send_signal(signal.SIGTERM)
            async with await request as r:
                assert r.status == 200 and "Server" not in r.headers  # the fast lane's
                assert r.headers["Connection"] == "close"
                answer = await r.json()
            assert answer["completion_tokens"] == TOKENS
            with pytest.raises(aiohttp.ClientConnectionError):  # closed, and not listening
                async with idle.get(gw.url + "/v2/health/ready"):
                    pass
        assert await asyncio.to_thread(gw.process.wait, 20) == 0
    finally:
        stop_gateway(gw)
