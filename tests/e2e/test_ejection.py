"""Outlier ejection: a backend that keeps failing leaves rotation, is health-checked,
and comes back at reduced weight; requests meanwhile fail over and succeed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import tritonclient.http as httpclient

from gateway.local_triton import TritonFleet
from tests.e2e.conftest import Gateway, dedicated_fleet, start_gateway, stop_gateway

pytestmark = pytest.mark.e2e

TOKEN = "ejection-admin-token"
EMBED = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 384], "data": [0.1] * 384}]}


@pytest.fixture(scope="module")
def fleet(run_dir: Path) -> Iterator[TritonFleet]:
    with dedicated_fleet(run_dir / "ejection-triton") as fleet:
        yield fleet


@pytest.fixture(scope="module")
def gateway(fleet: TritonFleet, run_dir: Path) -> Iterator[Gateway]:
    config = run_dir / "ejection.toml"
    config.write_text(
        # One failure: a server that refuses connections is out of rotation after the
        # first one anyway (unreachable), so more could never accumulate.
        "[outlier]\nconsecutive_failures = 1\nbase_ejection_s = 1.0\n"
        "health_check_interval_s = 0.2\n"
    )
    backends = [f"grpc://{s.grpc_url}" for s in fleet.servers]
    # Slow discovery, so that ejection (not discovery) is what takes the dead one out.
    gw = start_gateway(
        backends,
        run_dir / "ejection-gateway.log",
        "--config",
        str(config),
        "--policy",
        "round_robin",
        "--discovery-interval",
        "60",
        "--admin-token",
        TOKEN,
    )
    yield gw
    stop_gateway(gw)


async def backend_view(session: aiohttp.ClientSession, gateway: Gateway, backend: str) -> dict:
    async with session.get(
        gateway.url + "/admin/fleet", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as r:
        view = await r.json()
    (found,) = [b for b in view["backends"] if b["id"] == backend]
    return found


async def infer_ok(session: aiohttp.ClientSession, gateway: Gateway) -> None:
    async with session.post(gateway.url + "/v2/models/embed/infer", json=EMBED) as r:
        assert r.status == 200, await r.text()


async def test_failing_backend_is_ejected_and_returns(gateway: Gateway, fleet: TritonFleet) -> None:
    async with aiohttp.ClientSession() as session:
        fleet.kill(1)
        for _ in range(8):  # every one fails over to b0 and succeeds
            await infer_ok(session, gateway)
        b1 = await backend_view(session, gateway, "b1")
        assert b1["outlier"]["ejections"] == 1
        assert b1["outlier"]["ejected_for_s"] is not None
        assert b1["models"]["embed"]["circuit_open"]

        fleet.restart(1)
        deadline = time.monotonic() + 15
        while (await backend_view(session, gateway, "b1"))["models"]["embed"]["circuit_open"]:
            assert time.monotonic() < deadline, "b1 never came back"
            await asyncio.sleep(0.1)
        back = await backend_view(session, gateway, "b1")
        assert back["outlier"]["ejected_for_s"] is None
        assert back["outlier"]["weight"] < 1.0  # re-entered at reduced weight
        while (await backend_view(session, gateway, "b1"))["outlier"]["weight"] < 1.0:
            assert time.monotonic() < deadline, "b1's weight never recovered"
            await asyncio.sleep(0.1)
        for _ in range(4):
            await infer_ok(session, gateway)
    # The restarted server's own statistics start from zero: it served again.
    stats = httpclient.InferenceServerClient(f"127.0.0.1:{fleet.servers[1].http_port}")
    try:
        served = stats.get_inference_statistics("embed")["model_stats"][0]
    finally:
        stats.close()
    assert int(served["inference_stats"]["success"]["count"]) >= 1
