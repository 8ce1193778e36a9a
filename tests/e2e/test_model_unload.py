"""A model unloaded from one Triton server costs no request: the answer "unknown model"
from that backend, before anything reached the client, is retried on the next one,
and that backend stops getting the model's traffic at once (not at the next discovery)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from gateway.local_triton import TritonFleet
from tests.e2e.conftest import (
    UPSTREAMS,
    Gateway,
    admin_fleet,
    backend_over,
    dedicated_fleet,
    start_gateway,
    stop_gateway,
)

pytestmark = pytest.mark.e2e

TOKEN = "unload-admin-token"
TENSOR = np.zeros((1, 384), dtype=np.float32).tobytes()
BINARY_HEADER = (
    b'{"inputs":[{"name":"INPUT","datatype":"FP32","shape":[1,384],'
    b'"parameters":{"binary_data_size":1536}}]}'
)


@pytest.fixture(scope="module")
def fleet(run_dir: Path) -> Iterator[TritonFleet]:
    with dedicated_fleet(
        run_dir / "unload-triton", "--model-control-mode=explicit", "--load-model=*"
    ) as fleet:
        yield fleet


@pytest.fixture(scope="module", params=UPSTREAMS)
def gateway(request: pytest.FixtureRequest, fleet: TritonFleet, run_dir: Path) -> Iterator[Gateway]:
    """A gateway that would not notice the unload by itself for a minute: both the
    discovery and the metrics scrape are slow, so only the retry can save requests."""
    backends = [backend_over(s, request.param) for s in fleet.servers]
    gw = start_gateway(
        backends,
        run_dir / f"unload-gateway-{request.param}.log",
        "--policy",
        "round_robin",
        "--discovery-interval",
        "60",
        "--scrape-interval",
        "30",
        "--admin-token",
        TOKEN,
    )
    yield gw
    stop_gateway(gw)


def repository_call(fleet: TritonFleet, index: int, model: str, action: str) -> None:
    url = f"{fleet.servers[index].http_url}/v2/repository/models/{model}/{action}"
    with urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST")) as r:
        assert r.status == 200


async def infer(session: aiohttp.ClientSession, gateway: Gateway) -> int:
    headers = {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}
    async with session.post(
        gateway.url + "/v2/models/embed/infer", data=BINARY_HEADER + TENSOR, headers=headers
    ) as r:
        await r.read()
        return r.status


async def stream(session: aiohttp.ClientSession, gateway: Gateway) -> int:
    body = {"text_input": "We the People", "max_tokens": 2, "stream": True}
    async with session.post(gateway.url + "/v2/models/tiny_lm/generate_stream", json=body) as r:
        text = await r.text()
        return r.status if '"error"' not in text else 599


async def test_unloaded_model_costs_no_request(gateway: Gateway, fleet: TritonFleet) -> None:
    async with aiohttp.ClientSession() as session:
        assert await infer(session, gateway) == 200
        repository_call(fleet, 1, "embed", "unload")
        repository_call(fleet, 1, "tiny_lm", "unload")
        try:
            # Interleaved: round-robin rotates each model over both backends on its own.
            statuses = []
            for _ in range(6):
                statuses += [await infer(session, gateway), await stream(session, gateway)]
            assert statuses == [200] * 12
            view = await admin_fleet(gateway, TOKEN)
            (b1,) = [b for b in view["backends"] if b["id"] == "b1"]
            assert not b1["models"]["embed"]["ready"]
            assert not b1["models"]["tiny_lm"]["ready"]
        finally:
            repository_call(fleet, 1, "embed", "load")
            repository_call(fleet, 1, "tiny_lm", "load")
