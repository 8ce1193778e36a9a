"""At 3x capacity the gateway serves what it admitted and refuses the rest at once.

A gateway in front of the session fleet admits 4 requests (6 for critical priority);
waves of 12 concurrent tiny_lm streams arrive. Every request is either served in full
or refused with 429, ``Retry-After`` and an over-limit/saturated type, each refusal
comes back before any served stream could have finished (tiny_lm sleeps 5 ms per
token, so a served stream takes at least TOKENS x 5 ms), and afterwards nothing is
left in flight, in the admitter or on any backend slot.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.local_triton import TritonFleet
from tests.e2e.conftest import Gateway, http_status, start_gateway, stop_gateway

pytestmark = pytest.mark.e2e

CAPACITY = 4
CONCURRENCY = 3 * CAPACITY
WAVES = 3
TOKENS = 60  # a served stream takes >= 0.3 s in the model alone
ADMIN_TOKEN = "overload-test"
REQUEST_TIMEOUT_S = 30.0  # generous: only a hung request takes this long


@pytest.fixture(scope="module")
def small_gateway(triton_fleet: TritonFleet, run_dir: Path) -> Iterator[Gateway]:
    config = run_dir / "overload.toml"
    config.write_text(
        "[admission]\n"
        f"max_inflight = {CAPACITY}\nmax_inflight_hard = {CAPACITY + 2}\n"
        f"model_max_inflight = {CAPACITY}\nmodel_max_inflight_hard = {CAPACITY + 2}\n"
    )
    backends = [f"grpc://{s.grpc_url}?metrics={s.metrics_url}" for s in triton_fleet.servers]
    gw = start_gateway(
        backends,
        run_dir / "overload-gateway.log",
        "--config",
        str(config),
        "--admin-token",
        ADMIN_TOKEN,
    )
    try:
        deadline = time.monotonic() + 60
        while http_status(gw.url + "/v2/models/tiny_lm/ready") != 200:
            assert time.monotonic() < deadline, gw.log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield gw
    finally:
        stop_gateway(gw)


@dataclass
class Answer:
    status: int
    seconds: float
    tokens: int = 0
    retry_after: str | None = None
    error_type: str | None = None


async def stream(session: aiohttp.ClientSession, url: str) -> Answer:
    body = {"text_input": "We hold these truths", "max_tokens": TOKENS, "stream": True}
    start = time.monotonic()
    async with session.post(url + "/v2/models/tiny_lm/generate_stream", json=body) as r:
        if r.status != 200:
            error = await r.json()
            return Answer(
                r.status, time.monotonic() - start, 0, r.headers.get("Retry-After"), error["type"]
            )
        tokens = 0
        async for line in r.content:
            if line.startswith(b"data: "):
                event = json.loads(line[len(b"data: ") :])
                assert "error" not in event, event
                tokens += bool(event.get("text_output"))
    return Answer(200, time.monotonic() - start, tokens)


async def fleet_view(session: aiohttp.ClientSession, url: str) -> dict:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with session.get(url + "/admin/fleet", headers=headers) as r:
        assert r.status == 200, await r.text()
        view: dict = await r.json()
    return view


async def test_three_times_capacity_sheds_fast_and_serves_the_admitted(
    small_gateway: Gateway,
) -> None:
    # One connection per request: a client over capacity must not queue in the pool.
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    answers: list[Answer] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(WAVES):
            wave = [stream(session, small_gateway.url) for _ in range(CONCURRENCY)]
            answers += await asyncio.gather(*wave)
        view = await fleet_view(session, small_gateway.url)

    served = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status == 429]
    print(
        f"\nserved {len(served)}, refused {len(refused)};"
        f" served seconds min {min(a.seconds for a in served):.3f}"
        f" max {max(a.seconds for a in served):.3f};"
        f" refusal seconds max {max(a.seconds for a in refused):.3f}"
    )
    assert len(served) + len(refused) == len(answers), [a.status for a in answers]
    assert CAPACITY <= len(served) < len(answers)
    assert all(a.tokens == TOKENS for a in served)
    for answer in refused:
        assert answer.error_type in ("over_limit", "saturated"), answer
        assert answer.retry_after is not None and int(answer.retry_after) >= 1, answer
    # Refusals never wait for capacity: each is back before a served stream could end.
    assert max(a.seconds for a in refused) < min(a.seconds for a in served)

    assert view["models"]["tiny_lm"]["inflight"] == 0
    for backend in view["backends"]:
        for model, slot in backend["models"].items():
            assert slot["inflight"] == 0, (backend["id"], model, slot)
