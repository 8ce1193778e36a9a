"""Large JSON ``infer`` bodies, which the gateway checks with their long strings elided
(gateway/kserve_codec.py check_infer): answered exactly as Triton answers them, over a
backend's HTTP endpoint (forwarded as sent) and over gRPC (parsed in full to encode)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.local_triton import TritonFleet
from tests.e2e.conftest import (
    UPSTREAMS,
    Gateway,
    backend_over,
    start_gateway,
    stop_gateway,
    wait_model_ready,
)

JSON = {"Content-Type": "application/json"}
# Over the size above which bodies are checked elided, with strings longer than elided.
TEXTS = ["é" + "a" * 300_000, "short", 'quote " and \\ backslash ' * 40, "x" * 257]


@pytest.fixture(scope="module", params=UPSTREAMS)
def any_gateway(
    triton_fleet: TritonFleet, run_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Gateway]:
    backend = backend_over(triton_fleet.servers[0], request.param)
    gw = start_gateway([backend], run_dir / f"large-json-{request.param}.log")
    try:
        wait_model_ready(gw.url, "tokenize", time.monotonic() + 60)
        yield gw
    finally:
        stop_gateway(gw)


def _body(texts: list[str], shape: list[int]) -> bytes:
    tensor = {"name": "TEXT", "datatype": "BYTES", "shape": shape, "data": texts}
    return json.dumps({"inputs": [tensor], "outputs": [{"name": "REVERSED"}]}).encode()


async def test_a_large_json_infer_is_answered_in_full(any_gateway: Gateway) -> None:
    """Also with compression accepted (aiohttp's default Accept-Encoding): the reversed
    "é" is invalid UTF-8, which the gateway replaces, so the reply must be readable."""
    async with aiohttp.ClientSession() as session:
        async with session.post(
            any_gateway.url + "/v2/models/tokenize/infer",
            data=_body(TEXTS, [len(TEXTS)]),
            headers=JSON,
        ) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
    (output,) = answer["outputs"]
    expected = [t.encode()[::-1].decode("utf-8", "replace") for t in TEXTS]
    assert output["data"] == expected


@pytest.mark.parametrize(
    ("texts", "shape", "message"),
    [
        (TEXTS, [len(TEXTS) + 1], "input 'TEXT'"),  # the gateway's own count check
        ([*TEXTS[:-1], 7], [len(TEXTS)], "BYTES data must be strings"),
    ],
)
async def test_a_large_json_infer_that_is_wrong_gets_the_gateways_400(
    any_gateway: Gateway, texts: list[object], shape: list[int], message: str
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            any_gateway.url + "/v2/models/tokenize/infer",
            data=_body(texts, shape),  # type: ignore[arg-type]
            headers=JSON,
        ) as r:
            assert r.status == 400
            assert message in (await r.json())["error"]


async def test_a_bad_long_string_is_still_refused(any_gateway: Gateway) -> None:
    """A control character inside an elided string is not the gateway's to see: the
    answer is still a 400 (the gateway's parse of the whole body or Triton's)."""
    body = _body(TEXTS, [len(TEXTS)]).replace(b"aaaa", b"a\x01a", 1)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            any_gateway.url + "/v2/models/tokenize/infer", data=body, headers=JSON
        ) as r:
            assert r.status == 400, await r.text()
            assert "error" in await r.json()
