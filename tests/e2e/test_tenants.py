"""Keys, tenants and limits over the session fleet: 401s, per-tenant 429s under
concurrent load with the other tenants unaffected, and the request-size limits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.auth import hash_key
from gateway.local_triton import TritonFleet
from tests.e2e.conftest import Gateway, start_gateway, stop_gateway

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "tenants-admin-token"
KEYS = {
    "steady": "sk-steady-0123456789",  # no limits
    "ratelimited": "sk-ratelimited-0123456789",  # one request per 100 s
    "thrifty": "sk-thrifty-0123456789",  # 5 tokens per minute
    "single": "sk-single-0123456789",  # one request at a time
}
LIMITS = {
    "steady": "",
    "ratelimited": "requests_per_second = 0.01",
    "thrifty": "tokens_per_minute = 5",
    "single": "max_concurrent = 1",
}
MAX_TOKENS_LIMIT = 64
CONCURRENT = 6


@pytest.fixture(scope="module")
def keyed_gateway(triton_fleet: TritonFleet, run_dir: Path) -> Iterator[Gateway]:
    config = run_dir / "tenants.toml"
    tables = "".join(
        f'[tenants.{name}]\nkey_sha256 = "{hash_key(KEYS[name])}"\n{LIMITS[name]}\n'
        for name in KEYS
    )
    config.write_text(
        f"[gateway]\nmax_tokens_limit = {MAX_TOKENS_LIMIT}\nmax_header_bytes = 4096\n"
        f"max_inputs = 1\n{tables}"
    )
    gw = start_gateway(
        [s.backend_url for s in triton_fleet.servers],
        run_dir / "tenants-gateway.log",
        "--config",
        str(config),
        "--admin-token",
        ADMIN_TOKEN,
    )
    yield gw
    stop_gateway(gw)


def bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def chat(max_tokens: int = 8, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "tiny_lm",
        "messages": [{"role": "user", "content": "We hold these truths"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with session.post(url, json=body, headers=headers) as reply:
        return reply.status, await reply.json(), dict(reply.headers)


def error_type(body: dict[str, Any]) -> str:
    """The stable error type in either surface's error body."""
    error = body["error"]
    return str(error["code"] if isinstance(error, dict) else body["type"])


async def test_data_routes_need_a_valid_key(keyed_gateway: Gateway) -> None:
    url = keyed_gateway.url
    routes = [
        ("/v1/chat/completions", chat()),
        ("/v2/models/tiny_lm/generate", {"text_input": "We hold", "max_tokens": 4}),
        ("/v2/models/embed/infer", {"inputs": []}),
    ]
    async with aiohttp.ClientSession() as session:
        for path, body in routes:
            for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic x"}):
                status, reply, _ = await post(session, url + path, body, headers)
                assert (status, error_type(reply)) == (401, "unauthorized"), (path, headers)
                assert "sk-wrong" not in str(reply)
        async with session.get(url + "/v1/models") as r:
            assert r.status == 401
        async with session.get(url + "/v1/models", headers=bearer("steady")) as r:
            assert r.status == 200
        async with session.get(url + "/v2/health/ready") as r:
            assert r.status == 200  # probes stay open without a probe_token


async def test_admin_needs_the_admin_token_not_a_tenant_key(keyed_gateway: Gateway) -> None:
    url = keyed_gateway.url + "/admin/fleet"
    async with aiohttp.ClientSession() as session:
        for headers in ({}, bearer("steady")):
            async with session.get(url, headers=headers) as r:
                assert r.status == 401
        async with session.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 200
            assert KEYS["steady"] not in await r.text()


async def test_rate_limit_refuses_one_tenant_not_another(keyed_gateway: Gateway) -> None:
    url = keyed_gateway.url + "/v1/chat/completions"
    tenants = ["ratelimited", "steady"] * CONCURRENT
    async with aiohttp.ClientSession() as session:
        replies = await asyncio.gather(*(post(session, url, chat(), bearer(t)) for t in tenants))
    limited = [r for r, t in zip(replies, tenants, strict=True) if t != "steady"]
    steady = [r for r, t in zip(replies, tenants, strict=True) if t == "steady"]
    assert [status for status, _, _ in steady] == [200] * CONCURRENT
    # A bucket of one request that refills in 100 s: one of the burst gets through.
    assert sorted(status for status, _, _ in limited) == [200] + [429] * (CONCURRENT - 1)
    for status, body, headers in limited:
        assert headers["x-ratelimit-limit-requests"] == "1"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        if status == 429:
            assert error_type(body) == "tenant_rate_limit"
            assert body["error"]["type"] == "rate_limit_exceeded"
            assert int(headers["Retry-After"]) >= 1
    assert all("x-ratelimit-limit-requests" not in h for _, _, h in steady)


async def test_token_budget_finishes_the_stream_then_refuses(keyed_gateway: Gateway) -> None:
    url = keyed_gateway.url
    async with aiohttp.ClientSession() as session:
        # 20 tokens against a budget of 5: the stream runs to its end, in debt.
        async with session.post(
            url + "/v2/models/tiny_lm/generate_stream",
            json={"text_input": "We hold these truths", "max_tokens": 20, "stream": True},
            headers=bearer("thrifty"),
        ) as r:
            assert r.status == 200
            assert r.headers["x-ratelimit-limit-tokens"] == "5"
            events = [line async for line in r.content if line.startswith(b"data:")]
        assert len(events) == 20 and b'"completion_tokens":20' in events[-1]
        requests = [("thrifty", chat()), ("steady", chat())] * CONCURRENT
        replies = await asyncio.gather(
            *(post(session, url + "/v1/chat/completions", body, bearer(t)) for t, body in requests)
        )
    for (tenant, _), (status, body, headers) in zip(requests, replies, strict=True):
        if tenant == "steady":
            assert status == 200 and body["usage"]["completion_tokens"] > 0
        else:
            assert (status, error_type(body)) == (429, "tenant_token_limit")
            assert headers["x-ratelimit-remaining-tokens"] == "0"


async def test_concurrency_limit(keyed_gateway: Gateway) -> None:
    url = keyed_gateway.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=chat(60, stream=True), headers=bearer("single")) as r:
            assert r.status == 200
            await r.content.readline()  # the stream is under way: its slot is taken
            status, body, _ = await post(session, url, chat(), bearer("single"))
            assert (status, error_type(body)) == (429, "tenant_concurrency")
            other = await post(session, url, chat(), bearer("steady"))
            assert other[0] == 200
            await r.read()
        status, _, _ = await post(session, url, chat(), bearer("single"))
        assert status == 200  # the slot was released when the stream ended


async def test_request_limits(keyed_gateway: Gateway) -> None:
    url = keyed_gateway.url
    headers = bearer("steady")
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post(
            session, url + "/v1/chat/completions", chat(MAX_TOKENS_LIMIT + 1), headers
        )
        assert (status, body["error"]["param"]) == (400, "max_tokens")
        status, body, _ = await post(
            session,
            url + "/v2/models/tiny_lm/generate",
            {"text_input": "We hold", "parameters": {"max_tokens": MAX_TOKENS_LIMIT + 1}},
            headers,
        )
        assert status == 400 and "max_tokens" in body["error"]
        tensor = {"name": "INPUT", "datatype": "FP32", "shape": [1, 384], "data": [0.0] * 384}
        status, body, _ = await post(
            session, url + "/v2/models/embed/infer", {"inputs": [tensor, tensor]}, headers
        )
        assert status == 400 and "over the limit of 1" in body["error"]
        big = {f"x-filler-{i}": "f" * 1500 for i in range(3)}  # 4.5 KiB of headers
        status, body, _ = await post(session, url + "/v1/chat/completions", chat(), headers | big)
        assert (status, error_type(body)) == (431, "http_error")


def test_openai_client_sees_authentication_and_rate_limit_errors(keyed_gateway: Gateway) -> None:
    """The official client maps the gateway's 401 and tenant 429 to its own exceptions."""
    openai = pytest.importorskip("openai")
    base = keyed_gateway.url + "/v1"
    for key in ("sk-not-a-key", ""):
        client = openai.OpenAI(base_url=base, api_key=key or "unset", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(**chat())
    good = openai.OpenAI(base_url=base, api_key=KEYS["steady"], max_retries=0)
    assert good.chat.completions.create(**chat()).choices[0].message.content
    limited = openai.OpenAI(base_url=base, api_key=KEYS["ratelimited"], max_retries=0)
    with pytest.raises(openai.RateLimitError):  # its one request per 100 s is long used
        for _ in range(2):
            limited.chat.completions.create(**chat())
