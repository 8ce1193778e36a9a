"""Load-aware routing over a fleet of three real Triton servers, one of them slow.

b0 and b1 serve ``model_repository/``; b2 serves a copy of ``tiny_lm`` that sleeps
8x longer per token. A *side load* (streams sent straight to b2's Triton, past the
gateway) fills b2's queue; the gateway sees it only through the metrics scrape.
Counts per backend come from each Triton's statistics API; the side load's own
requests are subtracted, so the counts are the gateway's.

The VRAM test pushes scripted NVML readings through real `meshgate adapter gpu`
sidecar processes, one per backend, into the gateway's /admin/deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.gpu import TOKEN_ENV
from gateway.local_triton import TritonFleet, TritonServer, find_free_port_base
from tests.e2e.conftest import MODEL_REPOSITORY, REPO, Gateway, start_gateway, stop_gateway
from tests.e2e.test_routing import success_counts

pytestmark = pytest.mark.e2e

MODEL = "tiny_lm"
PROMPT = "We hold these truths"
ADMIN_TOKEN = "load-aware-admin-token"
SCRAPE_INTERVAL_S = 0.1
SLOW_MS_PER_TOKEN = 40  # b2; model_repository/ paces tiny_lm at 5 ms per token
# The side load: b2 takes 12 x 40 ms per stream, so 10 streams keep its queue deep for
# ~5 s, many times what a burst of short requests on b0 and b1 takes.
SIDE_STREAMS = 10
SIDE_TOKENS = 12
# Deep: well above what a burst's own in-flight requests add to b0's or b1's load.
DEEP_QUEUE = 6
BURST = 24  # a multiple of 3, so round-robin's share per backend is whole
STATS_SETTLE_S = 5.0  # longest wait for Triton's statistics to count a burst
BURST_TOKENS = 4
# Liveness bound of every wait for the gateway to see something: generous, never a
# measurement (the waits return as soon as the condition holds).
WAIT_S = 20.0
VRAM_TOTAL = 16 * 2**30


def tiny_lm_repository(root: Path, ms_per_token: int) -> Path:
    """A model repository holding only a copy of tiny_lm paced at ``ms_per_token``."""
    model = root / MODEL
    shutil.copytree(MODEL_REPOSITORY / MODEL, model, ignore=shutil.ignore_patterns("__pycache__"))
    config = model / "config.pbtxt"
    text, count = re.subn(
        r'(key: "ms_per_token", value: \{ string_value: )"\d+"',
        rf'\1"{ms_per_token}"',
        config.read_text(),
    )
    if count != 1:
        raise RuntimeError(f"no ms_per_token parameter in {config}")
    config.write_text(text)
    return root


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonFleet]:
    root = tmp_path_factory.mktemp("load-aware")
    slowed = tiny_lm_repository(root / "slowed", SLOW_MS_PER_TOKEN)
    with TritonFleet(
        count=3,
        port_base=find_free_port_base(3),
        model_repository=[MODEL_REPOSITORY, MODEL_REPOSITORY, slowed],
        log_dir=root / "triton",
    ) as triton:
        yield triton


@contextlib.asynccontextmanager
async def policy_gateway(fleet: TritonFleet, log_dir: Path, policy: str) -> AsyncIterator[Gateway]:
    """A gateway with ``policy``, once every backend ranks for the model."""
    backends = [f"grpc://{s.grpc_url}?metrics={s.metrics_url}" for s in fleet.servers]
    gateway = start_gateway(
        backends,
        log_dir / f"gateway-{policy}.log",
        "--policy",
        policy,
        "--admin-token",
        ADMIN_TOKEN,
        "--scrape-interval",
        str(SCRAPE_INTERVAL_S),
    )
    try:
        await wait_for_view(gateway, lambda v: len(ranking(v)) == 3, "all three backends rank")
        yield gateway
    finally:
        stop_gateway(gateway)


@pytest.fixture
async def hybrid_gateway(fleet: TritonFleet, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with policy_gateway(fleet, tmp_path, "hybrid") as gateway:
        yield gateway


@pytest.fixture
async def round_robin_gateway(fleet: TritonFleet, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with policy_gateway(fleet, tmp_path, "round_robin") as gateway:
        yield gateway


# -- talking to the gateway and the servers ---------------------------------------------


def admin_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


async def fleet_view(gateway: Gateway) -> dict[str, Any]:
    async with admin_session() as session, session.get(gateway.url + "/admin/fleet") as r:
        assert r.status == 200, await r.text()
        view: dict[str, Any] = await r.json()
    return view


def ranking(view: dict[str, Any]) -> list[str]:
    ranked: list[str] = view["models"][MODEL]["ranking"]
    return ranked


def model_state(view: dict[str, Any], backend_id: str) -> dict[str, Any]:
    backend = next(b for b in view["backends"] if b["id"] == backend_id)
    state: dict[str, Any] = backend["models"][MODEL]
    return state


async def wait_for_view(
    gateway: Gateway, condition: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """Poll /admin/fleet until ``condition`` holds; fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        view = await fleet_view(gateway)
        if condition(view):
            return view
        if time.monotonic() > deadline:
            pytest.fail(f"gateway never saw: {what}; last view {json.dumps(view)}")
        await asyncio.sleep(0.05)


async def stream(session: aiohttp.ClientSession, base_url: str, tokens: int) -> None:
    """One generate_stream request (gateway or Triton), read to its end."""
    body = {"text_input": PROMPT, "max_tokens": tokens, "stream": True}
    async with session.post(f"{base_url}/v2/models/{MODEL}/generate_stream", json=body) as r:
        text = await r.text()
    assert r.status == 200, text
    assert '"error"' not in text, text


async def burst(gateway: Gateway, count: int, concurrency: int) -> None:
    """``count`` streams through the gateway, ``concurrency`` at a time."""
    todo = iter(range(count))
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            for _ in todo:
                await stream(session, gateway.url, BURST_TOKENS)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


@contextlib.asynccontextmanager
async def side_load(server: TritonServer) -> AsyncIterator[None]:
    """SIDE_STREAMS streams straight to ``server``, running until the block ends and
    then waited for: every one of them has ended when the block does."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        streams = [
            asyncio.create_task(stream(session, server.http_url, SIDE_TOKENS))
            for _ in range(SIDE_STREAMS)
        ]
        try:
            yield
        finally:
            await asyncio.gather(*streams)


async def served_since(fleet: TritonFleet, before: list[int], total: int) -> list[int]:
    """Requests each server completed since ``before``, once they add up to ``total``
    (or after STATS_SETTLE_S): Triton counts a streamed request a moment after its last
    response is sent, so a read right after a burst can miss the last one."""
    deadline = time.monotonic() + STATS_SETTLE_S
    while True:
        served = [a - b for a, b in zip(success_counts(fleet, MODEL), before, strict=True)]
        if sum(served) >= total or time.monotonic() > deadline:
            return served
        await asyncio.sleep(0.05)


async def gateway_share_beside_side_load(fleet: TritonFleet, gateway: Gateway) -> list[int]:
    """Send a burst through the gateway while b2's queue is deep (and seen deep by the
    gateway); return how many of the burst each backend served."""
    before = success_counts(fleet, MODEL)
    async with side_load(fleet.servers[2]):
        await wait_for_view(
            gateway,
            lambda v: model_state(v, "b2")["queue_depth"] >= DEEP_QUEUE,
            f"b2's queue at {DEEP_QUEUE} or deeper",
        )
        await burst(gateway, BURST, concurrency=4)
    served = await served_since(fleet, before, BURST + SIDE_STREAMS)
    served[2] -= SIDE_STREAMS
    return served


# -- tests ------------------------------------------------------------------------------


async def test_hybrid_avoids_a_deep_queue_and_returns_once_it_drains(
    fleet: TritonFleet, hybrid_gateway: Gateway
) -> None:
    # Enough streams at once that every backend serves some, so the gateway has a
    # time-to-first-token average for b2 too: the return below is not for lack of one.
    await burst(hybrid_gateway, BURST, concurrency=6)
    view = await fleet_view(hybrid_gateway)
    ttft = [model_state(view, b)["ttft_ewma_s"] for b in ("b0", "b1", "b2")]
    assert None not in ttft, ttft

    served = await gateway_share_beside_side_load(fleet, hybrid_gateway)
    assert served[2] == 0 and sum(served) == BURST, served

    # Drained: the gateway sees b2's queue empty. Its slower TTFT average (~0.13 s
    # here, which weighs as much as ~2 requests in flight) ranks an idle b2 below an
    # idle b0 or b1, but above busy ones: with 12 streams at once, ~6 in flight on each
    # of b0 and b1, some go to b2 again.
    await wait_for_view(
        hybrid_gateway,
        lambda v: model_state(v, "b2")["queue_depth"] == 0 and not model_state(v, "b2")["stale"],
        "b2's queue empty",
    )
    before = success_counts(fleet, MODEL)
    await burst(hybrid_gateway, 2 * BURST, concurrency=12)
    served = await served_since(fleet, before, 2 * BURST)
    assert served[2] >= 1 and sum(served) == 2 * BURST, served


async def test_round_robin_keeps_sending_to_a_deep_queue(
    fleet: TritonFleet, round_robin_gateway: Gateway
) -> None:
    served = await gateway_share_beside_side_load(fleet, round_robin_gateway)
    assert served == [BURST // 3] * 3, served


# -- VRAM from GPU sidecars -------------------------------------------------------------


class Sidecar:
    """A `meshgate adapter gpu` process pushing one backend's scripted GPU readings."""

    def __init__(self, gateway: Gateway, backend_id: str, workdir: Path) -> None:
        self.source = workdir / f"gpu-{backend_id}.json"
        self.uuid = f"GPU-{backend_id}"
        self.set_vram(0.5)
        args = [
            sys.executable,
            "-m",
            "gateway.cli",
            "adapter",
            "gpu",
            "--backend-id",
            backend_id,
            "--push",
            gateway.url + "/admin/deltas",
            "--interval",
            str(SCRAPE_INTERVAL_S),
            "--scripted-source",
            str(self.source),
        ]
        log = (workdir / f"sidecar-{backend_id}.log").open("wb")
        env = {**os.environ, TOKEN_ENV: ADMIN_TOKEN}  # keeps the token out of `ps`
        self.process = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def set_vram(self, used_fraction: float) -> None:
        reading = {
            "uuid": self.uuid,
            "used": int(used_fraction * VRAM_TOTAL),
            "total": VRAM_TOTAL,
            "util": 0.5,
        }
        # Replaced atomically: the adapter re-reads the file on every poll.
        partial = self.source.with_suffix(".partial")
        partial.write_text(json.dumps([reading]))
        os.replace(partial, self.source)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=10)


@pytest.fixture
def sidecars(hybrid_gateway: Gateway, tmp_path: Path) -> Iterator[list[Sidecar]]:
    started: list[Sidecar] = []
    try:
        for backend_id in ("b0", "b1", "b2"):
            started.append(Sidecar(hybrid_gateway, backend_id, tmp_path))
        yield started
    finally:
        for sidecar in started:
            sidecar.stop()


def has_gpu_signal(view: dict[str, Any], backend_id: str) -> bool:
    return "gpu" in model_state(view, backend_id)["signal_ages_s"]


async def test_vram_over_threshold_takes_a_backend_out(
    fleet: TritonFleet, hybrid_gateway: Gateway, sidecars: list[Sidecar]
) -> None:
    await wait_for_view(
        hybrid_gateway,
        lambda v: all(has_gpu_signal(v, b) for b in ("b0", "b1", "b2")) and len(ranking(v)) == 3,
        "every sidecar's readings, all three backends ranking",
    )

    # b0 over the VRAM threshold (0.95 of total): out of the ranking, then no requests.
    sidecars[0].set_vram(0.97)
    await wait_for_view(hybrid_gateway, lambda v: "b0" not in ranking(v), "b0 out")
    before = success_counts(fleet, MODEL)
    await burst(hybrid_gateway, BURST, concurrency=4)
    served = await served_since(fleet, before, BURST)
    assert served[0] == 0 and sum(served) == BURST, served

    # All over: refused with 429, Retry-After and type "saturated"; nothing reaches Triton.
    sidecars[1].set_vram(0.99)
    sidecars[2].set_vram(0.96)
    view = await wait_for_view(hybrid_gateway, lambda v: not ranking(v), "every backend out")
    assert view["models"][MODEL]["saturated"] == 3
    before = success_counts(fleet, MODEL)
    body = {"text_input": PROMPT, "max_tokens": BURST_TOKENS, "stream": True}
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            url = f"{hybrid_gateway.url}/v2/models/{MODEL}/generate_stream"
            async with session.post(url, json=body) as r:
                assert r.status == 429, await r.text()
                assert int(r.headers["Retry-After"]) >= 1
                assert (await r.json())["type"] == "saturated"
    assert await served_since(fleet, before, 0) == [0, 0, 0]

    # Back under: served again.
    for sidecar in sidecars:
        sidecar.set_vram(0.5)
    await wait_for_view(hybrid_gateway, lambda v: len(ranking(v)) == 3, "all three back")

    # A sidecar that stops reporting leaves its backend stale, which counts as saturated.
    sidecars[1].stop(sig=signal.SIGKILL)
    await wait_for_view(
        hybrid_gateway,
        lambda v: model_state(v, "b1")["stale"] and "b1" not in ranking(v),
        "b1 stale and out",
    )
    before = success_counts(fleet, MODEL)
    await burst(hybrid_gateway, BURST, concurrency=4)
    served = await served_since(fleet, before, BURST)
    assert served[1] == 0 and sum(served) == BURST, served
