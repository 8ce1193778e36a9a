"""A client that hangs up stops the upstream work: Triton's generation stops with it.

`tiny_lm` counts every token it generates (`tiny_lm_tokens_generated_total` on each
server's metrics port) and checks `is_cancelled()` between tokens, so a generation
that the gateway failed to cancel keeps the counter growing at 1 token per
`ms_per_token` (5 ms): 100 ms after a hang-up, the count must have stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import aiohttp
import pytest

from gateway.local_triton import TritonFleet
from tests.e2e.conftest import Gateway, triton_metric

pytestmark = pytest.mark.e2e

TOKENS = "tiny_lm_tokens_generated_total"
DISCONNECTS = 100
# Long enough that no generation can finish by itself before the hang-up.
LONG = {"text_input": "We the People", "max_tokens": 400, "temperature": 1.0}


def tokens_generated(fleet: TritonFleet) -> float:
    return sum(triton_metric(s, TOKENS, "tiny_lm") for s in fleet.servers)


async def hang_up_mid_stream(session: aiohttp.ClientSession, url: str, events: int) -> None:
    body = {**LONG, "stream": True}
    async with session.post(url + "/v2/models/tiny_lm/generate_stream", json=body) as r:
        assert r.status == 200
        seen = 0
        async for line in r.content:
            if line.startswith(b"data: "):
                seen += 1
                if seen >= events:
                    break
        r.close()  # drop the connection, as a client that goes away does


async def hang_up_during_request(
    session: aiohttp.ClientSession, url: str, path: str, body: dict, delay: float
) -> None:
    # Cancelling the client task closes its connection before any reply arrived.
    with contextlib.suppress(asyncio.TimeoutError):
        async with asyncio.timeout(delay):
            async with session.post(url + path, json=body) as r:
                await r.read()
            raise AssertionError("the request finished before the client hung up")


async def test_hang_ups_stop_generation(gateway: Gateway, triton_fleet: TritonFleet) -> None:
    rng = random.Random(1234)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(DISCONNECTS):
            kind = rng.choice(
                ["stream-before-first", "stream-mid", "generate", "generate-stream-early"]
            )
            if kind == "stream-mid":
                await hang_up_mid_stream(session, gateway.url, rng.randint(1, 8))
            elif kind == "generate":
                await hang_up_during_request(
                    session,
                    gateway.url,
                    "/v2/models/tiny_lm/generate",
                    LONG,
                    rng.uniform(0.005, 0.08),
                )
            else:
                # Before the first token: tiny_lm sleeps ms_per_token before each token.
                await hang_up_during_request(
                    session,
                    gateway.url,
                    "/v2/models/tiny_lm/generate_stream",
                    {**LONG, "stream": True},
                    rng.uniform(0.0005, 0.004),
                )
            await asyncio.sleep(0.1)
            settled = tokens_generated(triton_fleet)
            await asyncio.sleep(0.1)
            assert tokens_generated(triton_fleet) == settled, (
                f"disconnect {i} ({kind}) kept generating"
            )


async def test_hang_ups_stop_whole_openai_answers(
    gateway: Gateway, triton_fleet: TritonFleet
) -> None:
    # A non-streamed completion: the client waits for one answer and goes away first.
    rng = random.Random(5678)
    body = {"model": "tiny_lm", "prompt": "We the People", "max_tokens": 400, "stream": False}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(10):
            await hang_up_during_request(
                session, gateway.url, "/v1/completions", body, rng.uniform(0.005, 0.08)
            )
            await asyncio.sleep(0.1)
            settled = tokens_generated(triton_fleet)
            await asyncio.sleep(0.1)
            assert tokens_generated(triton_fleet) == settled, f"disconnect {i} kept generating"
