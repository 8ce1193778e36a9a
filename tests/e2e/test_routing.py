"""Routing over the session fleet: policies, admission and the admin view."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import tritonclient.http as httpclient

from gateway.local_triton import TritonFleet
from tests.e2e.conftest import Gateway, start_gateway, stop_gateway

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "test-admin-token"


def fleet_backends(fleet: TritonFleet) -> list[str]:
    return [f"grpc://{s.grpc_url}?metrics={s.metrics_url}" for s in fleet.servers]


@pytest.fixture(scope="module")
def round_robin_gateway(triton_fleet: TritonFleet, run_dir: Path) -> Iterator[Gateway]:
    gw = start_gateway(
        fleet_backends(triton_fleet),
        run_dir / "rr-gateway.log",
        "--policy",
        "round_robin",
        "--admin-token",
        ADMIN_TOKEN,
    )
    yield gw
    stop_gateway(gw)


def success_counts(fleet: TritonFleet, model: str) -> list[int]:
    counts = []
    for server in fleet.servers:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            stats = client.get_inference_statistics(model)["model_stats"][0]
            counts.append(int(stats["inference_stats"]["success"]["count"]))
        finally:
            client.close()
    return counts


def test_round_robin_spreads_requests(
    round_robin_gateway: Gateway, triton_fleet: TritonFleet
) -> None:
    before = success_counts(triton_fleet, "embed")
    client = httpclient.InferenceServerClient(round_robin_gateway.host_port)
    inp = httpclient.InferInput("INPUT", [1, 384], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 384), dtype=np.float32))
    try:
        for _ in range(8):
            client.infer("embed", [inp])
    finally:
        client.close()
    added = [a - b for a, b in zip(success_counts(triton_fleet, "embed"), before, strict=True)]
    assert added == [4, 4], added


async def test_admin_fleet_view_and_auth(round_robin_gateway: Gateway) -> None:
    url = round_robin_gateway.url + "/admin/fleet"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as r:
            assert r.status == 401
        async with session.get(url, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with session.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 200
            view = await r.json()
    assert [b["id"] for b in view["backends"]] == ["b0", "b1"]
    tiny = view["backends"][0]["models"]["tiny_lm"]
    assert tiny["ready"] and not tiny["stale"]
    assert "runtime" in tiny["signal_ages_s"]
    assert view["models"]["embed"]["policy"] == "round_robin"
    assert sorted(view["models"]["embed"]["ranking"]) == ["b0", "b1"]
    scores = view["models"]["embed"]["scores"]
    assert sorted(scores) == ["b0", "b1"] and all(score >= 0 for score in scores.values())
    async with aiohttp.ClientSession() as session:
        async with session.get(round_robin_gateway.url + "/metrics") as r:
            exposition = await r.text()
    assert 'meshgate_backend_score{backend="b0",model="embed"}' in exposition
