"""The OpenAI API through the gateway, driven by the official `openai` package against
real tritonserver processes (model_repository/tiny_lm, the default `triton-llm` profile)."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from gateway.errors import Unavailable
from gateway.local_triton import TritonFleet, find_free_port_base
from tests.conftest import free_port
from tests.e2e.conftest import (
    MODEL_REPOSITORY,
    Gateway,
    http_status,
    start_gateway,
    stop_gateway,
)

pytestmark = pytest.mark.e2e

PROMPT = "We hold these truths"


def sync_client(gateway: Gateway) -> openai.OpenAI:
    # No retries: every error must reach the test as the first answer's exception.
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


def async_client(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


def chat_prompt(content: str) -> str:
    """The prompt the gateway's default template makes of one user message."""
    return ChatTemplate(DEFAULT_TEMPLATE).render([{"role": "user", "content": content}])


def user(content: str = PROMPT) -> list[Any]:
    return [{"role": "user", "content": content}]


async def read_sse_lines(response: aiohttp.ClientResponse) -> list[str]:
    return [line.decode().rstrip("\n") async for line in response.content if line.strip()]


# -- models -----------------------------------------------------------------------------


def test_models_lists_only_text_models(gateway: Gateway) -> None:
    client = sync_client(gateway)
    ids = [m.id for m in client.models.list()]
    assert "tiny_lm" in ids
    assert "embed" not in ids and "tokenize" not in ids
    model = client.models.retrieve("tiny_lm")
    assert (model.id, model.object, model.owned_by) == ("tiny_lm", "model", "meshgate")
    with pytest.raises(openai.NotFoundError, match="not a text model") as caught:
        client.models.retrieve("embed")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("no_such_model")


# -- completions ------------------------------------------------------------------------


def test_chat_sync_stops_at_max_tokens_with_usage(gateway: Gateway) -> None:
    reply = sync_client(gateway).chat.completions.create(
        model="tiny_lm", messages=user(), max_tokens=8, seed=11
    )
    (choice,) = reply.choices
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    # tiny_lm counts whitespace-separated words: of the templated prompt, and one per token.
    assert reply.usage.prompt_tokens == len(chat_prompt(PROMPT).split())
    assert reply.usage.completion_tokens == len(choice.message.content.split()) == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_chat_async_stream_arrives_token_by_token(gateway: Gateway) -> None:
    client = async_client(gateway)
    # A collection of this process's garbage mid-stream (~100 ms after the modules
    # before this one) would hold the tokens in the socket and read them as a burst.
    gc.collect()
    start = time.monotonic()
    stream = await client.chat.completions.create(
        model="tiny_lm",
        messages=user(),
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [(time.monotonic() - start, chunk) async for chunk in stream]
    texts = [
        (t, c.choices[0].delta.content)
        for t, c in chunks
        if c.choices and c.choices[0].delta.content
    ]
    assert len(texts) == 24  # one chunk per token
    assert chunks[0][1].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for _, c in chunks)
    assert len({c.id for _, c in chunks}) == 1
    finish, usage_chunk = chunks[-2][1], chunks[-1][1]
    assert finish.choices[0].finish_reason == "length" and not finish.choices[0].delta.content
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 24
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 24
    assert all(c.usage is None for _, c in chunks[:-1])
    # 24 tokens at ms_per_token each: the first must arrive long before the last.
    assert texts[0][0] < texts[-1][0] / 3, (texts[0][0], texts[-1][0])

    whole = await client.chat.completions.create(
        model="tiny_lm", messages=user(), max_tokens=24, temperature=0
    )
    assert whole.choices[0].message.content == "".join(text for _, text in texts)


def test_completions_sync_stream_equals_whole(gateway: Gateway) -> None:
    client = sync_client(gateway)
    whole = client.completions.create(model="tiny_lm", prompt=PROMPT, max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (4, 10)
    chunks = list(
        client.completions.create(
            model="tiny_lm", prompt=PROMPT, max_tokens=10, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.usage is None for c in chunks)  # no usage unless include_usage


async def test_raw_stream_ends_with_done(gateway: Gateway) -> None:
    body = {"model": "tiny_lm", "prompt": PROMPT, "max_tokens": 3, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            lines = await read_sse_lines(r)
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_word_finishes_with_stop(gateway: Gateway, stream: bool) -> None:
    client = sync_client(gateway)
    greedy = {"model": "tiny_lm", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    baseline = client.completions.create(**greedy).choices[0].text
    word = baseline.split()[3]
    if stream:
        chunks = list(client.completions.create(**greedy, stop=word, stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        reply = client.completions.create(**greedy, stop=[word, "never in this text"])
        text, reason = reply.choices[0].text, reply.choices[0].finish_reason
    assert reason == "stop"
    # tiny_lm cuts the text just before the first occurrence of a stop word.
    assert text == baseline[: baseline.find(word)]


async def test_seed_makes_output_repeatable(gateway: Gateway) -> None:
    client = async_client(gateway)

    async def sample(seed: int) -> str:
        reply = await client.chat.completions.create(
            model="tiny_lm", messages=user(), max_tokens=16, temperature=1.0, seed=seed
        )
        return reply.choices[0].message.content or ""

    first = [await sample(seed) for seed in (1, 2, 3, 4)]
    again = [await sample(seed) for seed in (1, 2, 3, 4)]
    assert first == again
    assert len(set(first)) > 1  # the seed matters: sampling is not secretly greedy


def test_user_and_zero_penalties_are_accepted(gateway: Gateway) -> None:
    reply = sync_client(gateway).chat.completions.create(
        model="tiny_lm",
        messages=[{"role": "system", "content": "terse"}, *user()],
        max_completion_tokens=3,
        user="alice",
        n=1,
        frequency_penalty=0,
        presence_penalty=0,
        store=False,
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 3


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"n": 2}, "n", "'n' must be 1"),
        ({"temperature": 3}, "temperature", "temperature"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens"),
        ({"seed": -1}, "seed", "seed"),
        ({"stop": [1]}, "stop", "stop"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed"),
        ({"extra_body": {"top_k": 5}}, "top_k", "Unrecognized request argument supplied: top_k"),
    ],
)
def test_invalid_parameters_are_bad_requests(
    gateway: Gateway, extra: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=message) as caught:
        sync_client(gateway).chat.completions.create(model="tiny_lm", messages=user(), **extra)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True])
async def test_model_refusal_before_first_token_is_a_bad_request(
    gateway: Gateway, stream: bool
) -> None:
    # tiny_lm itself rejects top_p=0: Triton's error arrives before any text, so it is
    # still an HTTP error, with the model's message.
    with pytest.raises(openai.BadRequestError, match=r"top_p must be in \(0, 1\]"):
        await async_client(gateway).chat.completions.create(
            model="tiny_lm", messages=user(), top_p=0, stream=stream
        )


@pytest.mark.parametrize("model", ["no_such_model", "embed"])
async def test_unknown_or_non_text_model_is_not_found(gateway: Gateway, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await async_client(gateway).completions.create(model=model, prompt="x")
    assert caught.value.status_code == 404
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")


async def test_malformed_json_gets_openai_error_shape(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + "/v1/chat/completions", data=b"{nope") as r:
            assert r.status == 400
            body = await r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def orphan_gateway(run_dir: Path) -> Iterator[Gateway]:
    gw = start_gateway([f"grpc://127.0.0.1:{free_port()}"], run_dir / "openai-orphan.log")
    yield gw
    stop_gateway(gw)


@pytest.mark.parametrize("stream", [False, True])
async def test_no_backend_is_503(orphan_gateway: Gateway, stream: bool) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await async_client(orphan_gateway).chat.completions.create(
            model="tiny_lm", messages=user(), stream=stream
        )
    assert caught.value.status_code == 503
    assert caught.value.code == Unavailable.type


# -- a chat template from the config ----------------------------------------------------


@pytest.fixture(scope="module")
def templated_gateway(triton_fleet: TritonFleet, run_dir: Path) -> Iterator[Gateway]:
    template = run_dir / "last-message.jinja"
    template.write_text("{{ messages[-1]['content'] }}")
    config = run_dir / "openai-template.toml"
    config.write_text(
        f'[models.tiny_lm]\nprofile = "triton-llm"\nchat_template = "{template.name}"\n'
    )
    backends = [f"grpc://{s.grpc_url}" for s in triton_fleet.servers]
    gw = start_gateway(backends, run_dir / "openai-template.log", "--config", str(config))
    try:
        wait_ready(gw)
        yield gw
    finally:
        stop_gateway(gw)


def wait_ready(gw: Gateway, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while http_status(gw.url + "/v2/models/tiny_lm/ready") != 200:
        assert time.monotonic() < deadline, gw.log_path.read_text()[-3000:]
        time.sleep(0.2)


def test_configured_chat_template_shapes_the_prompt(templated_gateway: Gateway) -> None:
    client = sync_client(templated_gateway)
    greedy = {"model": "tiny_lm", "max_tokens": 6, "temperature": 0}
    chat = client.chat.completions.create(
        messages=[{"role": "system", "content": "ignored by this template"}, *user()], **greedy
    )
    text = client.completions.create(prompt=PROMPT, **greedy)
    assert chat.usage is not None and chat.usage.prompt_tokens == len(PROMPT.split())
    assert chat.choices[0].message.content == text.choices[0].text


# -- failures after the stream started, and hang-ups (a fleet of our own) ----------------


class LoneFleet:
    """One tritonserver serving only tiny_lm, and a gateway in front of it, that tests
    may kill: the session fleet is shared and must never be harmed."""

    def __init__(self, run_dir: Path) -> None:
        repository = run_dir / "lone-repository"
        shutil.copytree(
            MODEL_REPOSITORY / "tiny_lm",
            repository / "tiny_lm",
            ignore=shutil.ignore_patterns("__pycache__"),
            dirs_exist_ok=True,
        )
        self.fleet = TritonFleet(1, find_free_port_base(1), repository, run_dir / "lone-triton")
        self.fleet.start()
        server = self.fleet.servers[0]
        try:
            self.gateway = start_gateway([f"grpc://{server.grpc_url}"], run_dir / "lone-gw.log")
            wait_ready(self.gateway)
        except BaseException:
            self.fleet.stop()
            raise

    def tokens_generated(self) -> float:
        with urllib.request.urlopen(self.fleet.servers[0].metrics_url, timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("tiny_lm_tokens_generated_total{"):
                    return float(line.rsplit(" ", 1)[1])
        raise AssertionError("tiny_lm_tokens_generated_total is not on the metrics port")

    def ensure_running(self) -> None:
        if http_status(self.fleet.servers[0].http_url + "/v2/health/ready") != 200:
            self.fleet.restart(0)
            wait_ready(self.gateway)

    def close(self) -> None:
        stop_gateway(self.gateway)
        self.fleet.stop()


@pytest.fixture(scope="module")
def lone(run_dir: Path) -> Iterator[LoneFleet]:
    lone = LoneFleet(run_dir)
    yield lone
    lone.close()


@pytest.fixture
def lone_running(lone: LoneFleet) -> LoneFleet:
    lone.ensure_running()
    return lone


LONG = {"model": "tiny_lm", "prompt": PROMPT, "max_tokens": 4000, "stream": True}


async def test_backend_death_mid_stream_is_an_error_event_without_done(
    lone_running: LoneFleet,
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(lone_running.gateway.url + "/v1/completions", json=LONG) as r:
            assert r.status == 200
            lines: list[str] = []
            async for raw in r.content:
                if raw.strip():
                    lines.append(raw.decode().rstrip("\n"))
                if len(lines) == 3:
                    lone_running.fleet.kill(0)
    texts = [
        json.loads(line[6:])["choices"][0]["text"]
        for line in lines
        if line.startswith('data: {"id"')
    ]
    assert len(texts) >= 3
    assert lines[-2] == "event: error", lines[-4:]
    error = json.loads(lines[-1][len("data: ") :])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert not any("[DONE]" in line for line in lines)


async def test_openai_client_raises_on_a_cut_stream(lone_running: LoneFleet) -> None:
    stream = await async_client(lone_running.gateway).completions.create(**LONG)
    received = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            received.append(chunk.choices[0].text)
            if len(received) == 3:
                lone_running.fleet.kill(0)
    assert len(received) >= 3


async def test_hang_up_stops_generation_upstream(lone_running: LoneFleet) -> None:
    before = lone_running.tokens_generated()
    stream = await async_client(lone_running.gateway).completions.create(**LONG)
    async for _ in stream:
        break
    await stream.close()
    await asyncio.sleep(0.5)  # cancellation reaches the model within one token
    settled = lone_running.tokens_generated()
    await asyncio.sleep(1.0)  # 200 tokens' worth at tiny_lm's 5 ms per token
    assert lone_running.tokens_generated() == settled
    assert 1 <= settled - before < 1000  # LONG asks for 4000


@pytest.fixture(scope="module")
def one_slot_gateway(lone: LoneFleet, run_dir: Path) -> Iterator[Gateway]:
    """A gateway in front of the lone server that admits one request at a time."""
    config = run_dir / "openai-one-slot.toml"
    config.write_text("[admission]\nmax_inflight = 1\nmax_inflight_hard = 1\n")
    backend = f"grpc://{lone.fleet.servers[0].grpc_url}"
    gw = start_gateway([backend], run_dir / "openai-one-slot.log", "--config", str(config))
    yield gw
    stop_gateway(gw)


async def test_over_capacity_is_rate_limited_with_retry_after(
    lone_running: LoneFleet, one_slot_gateway: Gateway
) -> None:
    wait_ready(one_slot_gateway)
    client = async_client(one_slot_gateway)
    holder = await client.completions.create(**LONG)
    try:
        async for _ in holder:
            break  # admitted and streaming: the only slot is taken
        with pytest.raises(openai.RateLimitError) as caught:
            await client.completions.create(model="tiny_lm", prompt=PROMPT, max_tokens=1)
    finally:
        await holder.close()
    assert caught.value.status_code == 429
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    assert caught.value.type == "rate_limit_exceeded"
