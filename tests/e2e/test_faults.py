"""A Triton server killed under steady load: failover before the first byte, explicit
errors after it, no hung request, and the restarted server is used again.

Three servers of our own (the session fleet is shared and must never be harmed) behind
a round-robin gateway. Client loops mix unary ``embed`` infers, ``/v2 generate_stream``
and ``/v1/chat/completions`` streams of ``tiny_lm``; server 1 gets SIGKILL at ~10 s and
is restarted at ~20 s; the load runs at least 30 s and until the restarted server has
served requests again. Every request is classified by what its client saw.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import tritonclient.http.aio as triton_http

from gateway.local_triton import TritonFleet, TritonServer, find_free_port_base
from tests.e2e.conftest import (
    MODEL_REPOSITORY,
    Gateway,
    admin_fleet,
    http_status,
    start_gateway,
    stop_gateway,
    triton_metric,
)

pytestmark = pytest.mark.e2e

VICTIM = 1
ADMIN_TOKEN = "faults-admin-token"
KILL_AT_S = 10.0
RESTART_AT_S = 20.0
LOAD_S = 30.0
BACK_IN_SERVICE_S = 10.0  # the restarted server must see traffic within this
REQUEST_TIMEOUT_S = 20.0  # generous: a request slower than this counts as hung
LOOPS_PER_KIND = 3
TOKENS = 200  # 5 ms each in tiny_lm: a stream spans ~1 s, so a kill lands mid-stream
EMBED_BODY = {
    "inputs": [
        {
            "name": "INPUT",
            "datatype": "FP32",
            "shape": [1, 384],
            "data": np.linspace(-1, 1, 384, dtype=np.float32).tolist(),
        }
    ]
}


class Outcome(enum.Enum):
    OK = "completed"
    FAILED_BEFORE_FIRST_BYTE = "failed before its first byte"
    CUT_WITH_ERROR = "cut mid-stream with an explicit error"
    CUT_SILENTLY = "cut mid-stream without an error"
    HUNG = "hung"


@pytest.fixture(scope="module")
def fleet(run_dir: Path) -> Iterator[TritonFleet]:
    with TritonFleet(
        3, find_free_port_base(3), MODEL_REPOSITORY, run_dir / "faults-triton"
    ) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def fault_gateway(fleet: TritonFleet, run_dir: Path) -> Iterator[Gateway]:
    backends = [f"grpc://{s.grpc_url}?metrics={s.metrics_url}" for s in fleet.servers]
    # The default retry budget (20% of requests in flight, at least 3) would refuse
    # some of the retries this kill needs, by design: with 1 s streams up to ~5
    # requests wait on the victim when it dies. Room for all of them, so that this test
    # checks failover itself; the budget is what a real outage of many servers needs.
    config = run_dir / "faults.toml"
    config.write_text(f"[gateway]\nretry_budget_min = {3 * LOOPS_PER_KIND}\n")
    gw = start_gateway(
        backends,
        run_dir / "faults-gateway.log",
        "--config",
        str(config),
        "--admin-token",
        ADMIN_TOKEN,
        "--policy",
        "round_robin",
        "--scrape-interval",
        "0.1",
        "--discovery-interval",
        "0.5",
    )
    try:
        deadline = time.monotonic() + 60
        for model in ("embed", "tiny_lm"):
            while http_status(f"{gw.url}/v2/models/{model}/ready") != 200:
                assert time.monotonic() < deadline, gw.log_path.read_text()[-3000:]
                time.sleep(0.2)
        yield gw
    finally:
        stop_gateway(gw)


# -- one request of each kind, classified ---------------------------------------------------


async def embed(session: aiohttp.ClientSession, url: str) -> tuple[Outcome, str]:
    async with session.post(url + "/v2/models/embed/infer", json=EMBED_BODY) as r:
        body = await r.read()
        if r.status != 200:
            return Outcome.FAILED_BEFORE_FIRST_BYTE, f"{r.status} {body[:200]!r}"
    (output,) = json.loads(body)["outputs"]
    assert output["shape"] == [1, 128]
    return Outcome.OK, ""


async def generate_stream(session: aiohttp.ClientSession, url: str) -> tuple[Outcome, str]:
    """A /v2 stream: the end is clean only after TOKENS text events and no error event."""
    body = {"text_input": "We hold these truths", "max_tokens": TOKENS, "stream": True}
    async with session.post(url + "/v2/models/tiny_lm/generate_stream", json=body) as r:
        if r.status != 200:
            return Outcome.FAILED_BEFORE_FIRST_BYTE, f"{r.status} {await r.text()}"
        texts = 0
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[len(b"data: ") :])
            if "error" in event:
                return Outcome.CUT_WITH_ERROR, event["error"]
            texts += bool(event.get("text_output"))
    if texts < TOKENS:
        return Outcome.CUT_SILENTLY, f"{texts} of {TOKENS} tokens, then a clean end"
    return Outcome.OK, ""


async def chat_stream(session: aiohttp.ClientSession, url: str) -> tuple[Outcome, str]:
    """A /v1 stream: clean only with a finish_reason and [DONE]; cut only with an
    ``event: error`` and no [DONE]."""
    body = {
        "model": "tiny_lm",
        "messages": [{"role": "user", "content": "We hold these truths"}],
        "max_tokens": TOKENS,
        "stream": True,
    }
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            return Outcome.FAILED_BEFORE_FIRST_BYTE, f"{r.status} {await r.text()}"
        lines = [line.rstrip(b"\n") async for line in r.content if line.strip()]
    if b"event: error" in lines:
        if b"data: [DONE]" in lines:
            return Outcome.CUT_SILENTLY, "an error event and [DONE]"
        return Outcome.CUT_WITH_ERROR, lines[-1].decode()
    finished = any(b'"finish_reason":"length"' in line for line in lines)
    if lines[-1:] != [b"data: [DONE]"] or not finished:
        return Outcome.CUT_SILENTLY, f"ended without an error: {lines[-2:]!r}"
    return Outcome.OK, ""


Request = Callable[[aiohttp.ClientSession, str], Awaitable[tuple[Outcome, str]]]


async def classified(request: Request, session: aiohttp.ClientSession, url: str) -> Outcome:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            outcome, detail = await request(session, url)
    except TimeoutError:
        outcome, detail = Outcome.HUNG, ""
    except aiohttp.ClientPayloadError as exc:
        # The gateway hung up mid-response instead of ending it with an error.
        outcome, detail = Outcome.CUT_SILENTLY, str(exc)
    except aiohttp.ClientError as exc:
        outcome, detail = Outcome.FAILED_BEFORE_FIRST_BYTE, f"{type(exc).__name__}: {exc}"
    if outcome not in (Outcome.OK, Outcome.CUT_WITH_ERROR):
        print(f"{request.__name__}: {outcome.value}: {detail}")
    return outcome


# -- the victim's own view ------------------------------------------------------------------


async def victim_successes(fleet: TritonFleet) -> int:
    """Successful inferences on the victim since it (re)started, from Triton itself."""
    client = triton_http.InferenceServerClient(fleet.servers[VICTIM].http_url[len("http://") :])
    try:
        stats = await client.get_inference_statistics()
    finally:
        await client.close()
    return sum(int(m["inference_stats"]["success"]["count"]) for m in stats["model_stats"])


async def wait_for_traffic(fleet: TritonFleet) -> float:
    """Seconds until the restarted victim has served a request, at most BACK_IN_SERVICE_S."""
    start = time.monotonic()
    while await victim_successes(fleet) == 0:
        assert time.monotonic() - start < BACK_IN_SERVICE_S, "restarted server got no traffic"
        await asyncio.sleep(0.25)
    return time.monotonic() - start


TOKENS_METRIC = "tiny_lm_tokens_generated_total"


async def streaming_on_victim(
    gateway: Gateway, server: TritonServer, within_s: float = 10.0
) -> None:
    """Return once a stream through the gateway is in flight on the victim (its slot's
    in-flight count, from /admin/fleet) while the victim generates tokens (its counter
    moves over 20 ms), or after ``within_s``: a kill then cuts that stream mid-way."""
    deadline = time.monotonic() + within_s
    victim = f"b{VICTIM}"
    while time.monotonic() < deadline:
        view = await admin_fleet(gateway, ADMIN_TOKEN)
        (backend,) = [b for b in view["backends"] if b["id"] == victim]
        if backend["models"]["tiny_lm"]["inflight"] >= 1:
            before = await asyncio.to_thread(triton_metric, server, TOKENS_METRIC, "tiny_lm")
            await asyncio.sleep(0.02)
            if await asyncio.to_thread(triton_metric, server, TOKENS_METRIC, "tiny_lm") > before:
                return
        await asyncio.sleep(0.01)


async def test_kill_9_under_load(fleet: TritonFleet, fault_gateway: Gateway) -> None:
    outcomes: collections.Counter[tuple[str, Outcome]] = collections.Counter()
    stop = asyncio.Event()

    async def client_loop(request: Request, session: aiohttp.ClientSession) -> None:
        # Bounded by the stop event, which the scenario sets within ~LOAD_S + restart time.
        while not stop.is_set():
            outcomes[(request.__name__, await classified(request, session, fault_gateway.url))] += 1

    async def scenario() -> float:
        started = time.monotonic()
        await asyncio.sleep(KILL_AT_S)
        await streaming_on_victim(fault_gateway, fleet.servers[VICTIM])
        fleet.kill(VICTIM)
        await asyncio.sleep(RESTART_AT_S - KILL_AT_S)
        # restart() blocks until Triton is ready; its thread lives as long as the loop,
        # which keeps the restarted process (it dies with the thread that started it).
        await asyncio.to_thread(fleet.restart, VICTIM)
        back_in_service = await wait_for_traffic(fleet)
        await asyncio.sleep(max(0.0, LOAD_S - (time.monotonic() - started)))
        stop.set()
        return back_in_service

    async with aiohttp.ClientSession() as session:
        loops = [
            client_loop(request, session)
            for request in (embed, generate_stream, chat_stream)
            for _ in range(LOOPS_PER_KIND)
        ]
        try:
            back_in_service, *_ = await asyncio.gather(scenario(), *loops)
        finally:
            stop.set()

    print(f"\nrestarted server served again after {back_in_service:.2f} s")
    for (kind, outcome), count in sorted(outcomes.items(), key=lambda kv: kv[0][0]):
        print(f"{kind:16} {outcome.value:40} {count}")
    by_outcome: collections.Counter[Outcome] = collections.Counter()
    for (_, outcome), count in outcomes.items():
        by_outcome[outcome] += count
    assert by_outcome[Outcome.FAILED_BEFORE_FIRST_BYTE] == 0, "a request was not failed over"
    assert by_outcome[Outcome.CUT_SILENTLY] == 0, "a cut stream ended without an error"
    assert by_outcome[Outcome.HUNG] == 0
    # The kill must have caught streams mid-way, or the test proved nothing about them.
    assert by_outcome[Outcome.CUT_WITH_ERROR] >= 1
    assert by_outcome[Outcome.OK] > 100
    assert fault_gateway.process.poll() is None
