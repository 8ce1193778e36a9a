"""Deadlines and stalled streams, against a real Triton whose model is slowed down."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.local_triton import TritonFleet, find_free_port_base
from tests.e2e.conftest import (
    MODEL_REPOSITORY,
    UPSTREAMS,
    Gateway,
    backend_over,
    start_gateway,
    stop_gateway,
)

pytestmark = pytest.mark.e2e

MS_PER_TOKEN = 1500
IDLE_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def slow_fleet(run_dir: Path) -> Iterator[TritonFleet]:
    repository = run_dir / "slow-repository"
    shutil.copytree(MODEL_REPOSITORY / "tiny_lm", repository / "tiny_lm")
    config = repository / "tiny_lm" / "config.pbtxt"
    text = config.read_text()
    assert 'string_value: "5"' in text
    config.write_text(text.replace('string_value: "5"', f'string_value: "{MS_PER_TOKEN}"'))
    fleet = TritonFleet(
        count=1,
        port_base=find_free_port_base(1),
        model_repository=repository,
        log_dir=run_dir / "slow-triton",
    )
    with fleet:
        yield fleet


# Streams go over Triton's HTTP endpoint when the backend names one, else over gRPC.
@pytest.fixture(scope="module", params=UPSTREAMS)
def slow_gateway(
    slow_fleet: TritonFleet, run_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Gateway]:
    gw = start_gateway(
        [backend_over(slow_fleet.servers[0], request.param)],
        run_dir / f"slow-gateway-{request.param}.log",
        "--stream-idle-timeout",
        str(IDLE_TIMEOUT_S),
    )
    yield gw
    stop_gateway(gw)


async def test_request_deadline_is_504_before_first_byte(slow_gateway: Gateway) -> None:
    body = {"text_input": "We the People", "max_tokens": 2, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            slow_gateway.url + "/v2/models/tiny_lm/generate_stream",
            json=body,
            headers={"x-meshgate-timeout-ms": "300"},
        ) as r:
            assert r.status == 504
            assert (await r.json())["type"] == "timeout"


async def test_stalled_stream_is_cut_with_an_explicit_error(slow_gateway: Gateway) -> None:
    # The first token may take its time (it is bounded by the deadline only); the
    # second is 1.5 s later, three times the idle timeout.
    body = {"text_input": "We the People", "max_tokens": 3, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            slow_gateway.url + "/v2/models/tiny_lm/generate_stream", json=body
        ) as r:
            assert r.status == 200
            events = [
                json.loads(line[len(b"data: ") :])
                async for line in r.content
                if line.startswith(b"data: ")
            ]
    assert "text_output" in events[0]
    assert "stalled" in events[-1]["error"]
    assert len(events) == 2
