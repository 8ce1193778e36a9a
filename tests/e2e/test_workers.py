"""`meshgate serve --workers 2` in front of the real 2-server fleet: both workers serve,
the Tritons are scraped once (not once per worker), in-flight counts are shared, a
killed worker is replaced without leaving its counts behind, and SIGTERM drains."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.local_triton import TritonFleet, TritonServer
from tests.e2e.conftest import (
    Gateway,
    admin_fleet,
    start_gateway,
    stop_gateway,
    wait_for_workers,
)

pytestmark = pytest.mark.e2e

TOKEN = "workers-admin-token"
SCRAPE_INTERVAL_S = 0.1
STREAMS = 16  # all on one worker by chance: 2 in 2**16
# ~10 s of tiny_lm at 5 ms per token: the streams stay open until the test cancels them.
LONG_STREAM = {"text_input": "We the People", "max_tokens": 2000, "stream": True}


class ScrapeCounter:
    """A metrics endpoint in front of one Triton's: answers with Triton's own text and
    counts the scrapes that reached it."""

    def __init__(self, server: TritonServer) -> None:
        self.target = server.metrics_url
        self.count = 0
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with urllib.request.urlopen(counter.target, timeout=5) as reply:
                    body = reply.read()
                counter.count += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self.backend_url = (
            f"grpc://{server.grpc_url}?metrics=http://127.0.0.1:{self._http.server_port}/metrics"
            f"&http=127.0.0.1:{server.http_port}"
        )

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def workers_gateway(backends: list[str], log_path: Path, *extra: str) -> Gateway:
    gw = start_gateway(
        backends,
        log_path,
        "--workers",
        "2",
        "--admin-token",
        TOKEN,
        "--scrape-interval",
        str(SCRAPE_INTERVAL_S),
        *extra,
    )
    wait_for_workers(gw, 2, "tiny_lm", TOKEN)
    return gw


@pytest.fixture(scope="module")
def counters(triton_fleet: TritonFleet) -> Iterator[list[ScrapeCounter]]:
    found = [ScrapeCounter(server) for server in triton_fleet.servers]
    yield found
    for counter in found:
        counter.close()


@pytest.fixture(scope="module")
def gateway2(counters: list[ScrapeCounter], run_dir: Path) -> Iterator[Gateway]:
    gw = workers_gateway([c.backend_url for c in counters], run_dir / "workers-gateway.log")
    try:
        yield gw
    finally:
        stop_gateway(gw)


def children(gw: Gateway) -> set[int]:
    """The supervisor's child processes: its workers and multiprocessing's resource tracker."""
    pid = gw.process.pid
    return set(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))


def worker_pids(gw: Gateway) -> set[int]:
    return {pid for pid in children(gw) if b"spawn_main" in _cmdline(pid)}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


async def fresh_views(gw: Gateway, wanted: int = 2, tries: int = 60) -> dict[int, dict[str, Any]]:
    """/admin/fleet over new connections until ``wanted`` workers answered: pid -> view."""
    views: dict[int, dict[str, Any]] = {}
    for _ in range(tries):
        view = await admin_fleet(gw, TOKEN)  # a new session, so a new connection
        views[view["pid"]] = view
        if len(views) >= wanted:
            break
    return views


def dispatched(view: dict[str, Any], model: str = "tiny_lm") -> float:
    """In-flight requests on the model's slots: every worker's, from the shared array."""
    return sum(b["models"][model]["inflight"] for b in view["backends"] if model in b["models"])


def admitted(view: dict[str, Any], model: str = "tiny_lm") -> int:
    """Requests the answering worker admitted for the model."""
    return int(view["models"][model]["inflight"])


@contextlib.asynccontextmanager
async def open_streams(gw: Gateway, count: int) -> AsyncIterator[None]:
    """``count`` long streams, each on its own connection (so the kernel spreads them
    over the workers), in flight once the gateway counts them (Triton queues all but
    one per server), until the block ends and they are hung up."""

    async def stream() -> None:
        async with aiohttp.ClientSession() as session:
            url = gw.url + "/v2/models/tiny_lm/generate_stream"
            async with session.post(url, json=LONG_STREAM) as reply:
                async for _ in reply.content:
                    pass

    tasks = [asyncio.create_task(stream()) for _ in range(count)]
    try:
        await wait_for_counts(gw, count)
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for_counts(gw: Gateway, want: float, timeout: float = 15) -> None:
    """Until the shared in-flight count of tiny_lm is ``want`` as seen by a worker."""
    deadline = time.monotonic() + timeout
    while dispatched(view := await admin_fleet(gw, TOKEN)) != want:
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.1)


async def test_both_workers_serve_and_share_inflight(gateway2: Gateway) -> None:
    async with open_streams(gateway2, STREAMS):
        views = await fresh_views(gateway2)
        assert set(views) == worker_pids(gateway2), "every answer came from a worker"
        # Each worker serves some streams, and sees all of them on the shared slots.
        assert sorted(admitted(v) > 0 for v in views.values()) == [True, True], views
        assert sum(admitted(v) for v in views.values()) == STREAMS
        assert [dispatched(v) for v in views.values()] == [STREAMS, STREAMS]
    await wait_for_counts(gateway2, 0)
    views = await fresh_views(gateway2)
    assert [admitted(v) for v in views.values()] == [0, 0]


async def test_tritons_are_scraped_once_not_per_worker(
    gateway2: Gateway, counters: list[ScrapeCounter]
) -> None:
    window_s = 3.0
    before = [c.count for c in counters]
    await asyncio.sleep(window_s)
    scrapes = [c.count - b for c, b in zip(counters, before, strict=True)]
    one_process = window_s / SCRAPE_INTERVAL_S  # 30 for each backend
    # Two scraping workers would make ~60; a loaded machine may scrape a little late.
    for count in scrapes:
        assert 0.5 * one_process <= count <= 1.25 * one_process, scrapes


async def test_dead_worker_is_replaced_and_its_inflight_taken_back(gateway2: Gateway) -> None:
    async with open_streams(gateway2, STREAMS):
        views = await fresh_views(gateway2)
        victim = min(views, key=lambda pid: admitted(views[pid]))
        survivor_streams = STREAMS - admitted(views[victim])
        os.kill(victim, signal.SIGKILL)
        # The victim's streams end with it; its counts leave the shared array.
        await wait_for_counts(gateway2, survivor_streams)
    await wait_for_counts(gateway2, 0)
    # A new worker took the victim's place, and serves.
    deadline = time.monotonic() + 60
    while victim in (views := await fresh_views(gateway2)) or len(views) != 2:
        assert time.monotonic() < deadline, gateway2.log_path.read_text()[-3000:]
        await asyncio.sleep(0.5)
    assert set(views) == worker_pids(gateway2)


async def test_sigterm_drains_every_worker_and_exits_0(
    triton_fleet: TritonFleet, run_dir: Path
) -> None:
    backends = [s.backend_url for s in triton_fleet.servers]
    gw = workers_gateway(backends, run_dir / "workers-drain.log", "--drain-timeout", "20")
    try:
        assert len(worker_pids(gw)) == 2
        pids = children(gw)
        tokens = 120  # ~0.6 s: still streaming when SIGTERM arrives
        body = {"text_input": "We the People", "max_tokens": tokens, "stream": True}
        events = []
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.url + "/v2/models/tiny_lm/generate_stream", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data: "):
                        events.append(json.loads(line[len(b"data: ") :]))
                        if len(events) == 3:
                            gw.process.send_signal(signal.SIGTERM)
        assert not any("error" in e for e in events)
        assert sum(1 for e in events if e.get("text_output")) == tokens
        assert await asyncio.to_thread(gw.process.wait, 30) == 0
        deadline = time.monotonic() + 5  # the resource tracker leaves after the supervisor
        while left := [pid for pid in pids if Path(f"/proc/{pid}").exists()]:
            assert time.monotonic() < deadline, f"left running: {left}"
            await asyncio.sleep(0.1)
    finally:
        stop_gateway(gw)
