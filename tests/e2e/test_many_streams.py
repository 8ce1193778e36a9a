"""Hundreds of concurrent streams through one gateway process all complete with every
token, leave nothing in flight, and the gateway exposes its event-loop lag.
bench/streams.py runs the 1,000-stream version and measures memory and lag."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.local_triton import TritonFleet, find_free_port_base
from tests.e2e.conftest import (
    Gateway,
    admin_fleet,
    admit_everything,
    http_status,
    start_gateway,
    stop_gateway,
    tiny_lm_stream,
    tiny_lm_variant,
    total_inflight,
)

pytestmark = pytest.mark.e2e

STREAMS = 300
MAX_TOKENS = 8
TOKEN = "many-streams-admin-token"


@pytest.fixture(scope="module")
def fleet(run_dir: Path) -> Iterator[TritonFleet]:
    # One instance generating every stream at once, so none waits in Triton's queue.
    repository = tiny_lm_variant(
        run_dir / "many-streams-repository", concurrent_sequences=str(STREAMS)
    )
    with TritonFleet(1, find_free_port_base(1), repository, run_dir / "many-streams") as fleet:
        yield fleet


@pytest.fixture(scope="module")
def gateway(fleet: TritonFleet, run_dir: Path) -> Iterator[Gateway]:
    config = admit_everything(run_dir / "many-streams.toml", STREAMS)
    gw = start_gateway(
        [f"grpc://{s.grpc_url}" for s in fleet.servers],
        run_dir / "many-streams-gateway.log",
        "--config",
        str(config),
        "--admin-token",
        TOKEN,
        # Fewer than the streams' client connections: serve() raises it to the hard limit.
        open_files=STREAMS - 44,
    )
    try:
        deadline = time.monotonic() + 60
        while http_status(gw.url + "/v2/models/tiny_lm/ready") != 200:
            assert time.monotonic() < deadline, "tiny_lm never became ready"
            time.sleep(0.2)
        yield gw
    finally:
        stop_gateway(gw)


async def test_hundreds_of_streams_complete_with_every_token(gateway: Gateway) -> None:
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=STREAMS)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tokens = await asyncio.gather(
            *(
                tiny_lm_stream(session, gateway.url, MAX_TOKENS, openai=i % 2 == 0)
                for i in range(STREAMS)
            )
        )
    assert tokens == [MAX_TOKENS] * STREAMS
    # A lease is released just after its stream's last byte went out.
    deadline = time.monotonic() + 5
    while total_inflight(await admin_fleet(gateway, TOKEN)) != 0:
        assert time.monotonic() < deadline, "requests still counted in flight"
        await asyncio.sleep(0.1)


async def test_event_loop_lag_and_gc_pauses_are_exposed(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/metrics") as reply:
            text = await reply.text()
    samples = {
        (sample.name, sample.labels.get("generation")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(("meshgate_event_loop_lag", "meshgate_gc_pause"))
    }
    assert samples[("meshgate_event_loop_lag_seconds_count", None)] > 0  # a reading every 50 ms
    assert samples[("meshgate_event_loop_lag_max_seconds", None)] >= 0.0
    # Hundreds of streams (and the gateway's start) allocate enough for young collections.
    assert samples[("meshgate_gc_pause_seconds_count", "0")] > 0
    assert ("meshgate_gc_pause_seconds_count", "2") in samples
