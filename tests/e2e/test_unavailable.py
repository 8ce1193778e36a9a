"""A gateway whose only backend is down answers 503 with a JSON error, not a hang."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import Gateway, start_gateway, stop_gateway

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def orphan_gateway(run_dir: Path) -> Iterator[Gateway]:
    gw = start_gateway([f"grpc://127.0.0.1:{free_port()}"], run_dir / "orphan-gateway.log")
    yield gw
    stop_gateway(gw)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/health/ready"),
        ("POST", "/v2/models/embed/infer"),
        ("POST", "/v2/models/tiny_lm/generate_stream"),
        ("GET", "/v2"),
    ],
)
async def test_no_backend_ready_is_503(orphan_gateway: Gateway, method: str, path: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, orphan_gateway.url + path, json={"text_input": "x"}
        ) as r:
            assert r.status == 503
            assert "error" in await r.json()
        async with session.get(orphan_gateway.url + "/v2/health/live") as r:
            assert r.status == 200
