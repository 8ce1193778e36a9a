"""adapters.gpu: scripted readings to deltas, no GPU here, and the sidecar pushing for real.

The sidecar runs as a real subprocess and pushes over real sockets to a small aiohttp
receiver started by the test (the gateway's /admin/deltas is not part of this module).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from adapters import gpu
from adapters.deltas import Delta, GpuStateDelta, deltas_from_json
from adapters.gpu import (
    BACKLOG_LIMIT,
    DeltaPusher,
    GpuAdapter,
    GpuUnavailable,
    PynvmlSource,
    ScriptedNvmlSource,
)
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"
GiB = 2**30


def script(path: Path, *gpus: tuple[str, int, int, float]) -> None:
    # Write-then-rename so the running sidecar never reads a half-written file.
    partial = path.with_suffix(".partial")
    partial.write_text(
        json.dumps(
            [
                {"uuid": u, "used": used, "total": total, "util": util}
                for u, used, total, util in gpus
            ]
        )
    )
    partial.replace(path)


# -- the adapter -----------------------------------------------------------------------


def test_scripted_readings_become_deltas_of_what_changed(tmp_path: Path) -> None:
    readings = tmp_path / "gpus.json"
    script(readings, ("GPU-a", 1 * GiB, 16 * GiB, 0.25), ("GPU-b", 0, 16 * GiB, 0.0))
    adapter = GpuAdapter("b0", ScriptedNvmlSource(readings), interval=0.5)

    first = adapter.poll_once()
    assert [(d.backend, d.gpu, d.max_age) for d in first] == [
        ("b0", "GPU-a", 2.0),
        ("b0", "GPU-b", 2.0),
    ]
    assert first[0].changes() == {
        "vram_used_bytes": 1 * GiB,
        "vram_total_bytes": 16 * GiB,
        "utilization": 0.25,
    }

    # Nothing changed: one heartbeat per GPU, newer, carrying no field.
    second = adapter.poll_once()
    assert [d.changes() for d in second] == [{}, {}]
    assert second[0].observed_at >= first[0].observed_at

    script(readings, ("GPU-a", 3 * GiB, 16 * GiB, 0.25), ("GPU-b", 0, 16 * GiB, 0.9))
    third = adapter.poll_once()
    assert [d.changes() for d in third] == [{"vram_used_bytes": 3 * GiB}, {"utilization": 0.9}]

    adapter.resync()
    assert adapter.poll_once()[1].changes() == {
        "vram_used_bytes": 0,
        "vram_total_bytes": 16 * GiB,
        "utilization": 0.9,
    }


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "No such file"),
        ("{not json", "Expecting property name"),
        ("[]", "expected a non-empty list"),
        ('[{"uuid": "GPU-a", "used": -1, "total": 1, "util": 0}]', "`used` must be a non-negative"),
        (
            '[{"uuid": "GPU-a", "used": 1, "total": 1, "util": 50}]',
            "`util` must be a number in [0, 1]",
        ),
        ('[{"used": 1, "total": 1, "util": 0}]', "`uuid` must be a non-empty string"),
    ],
)
def test_bad_scripted_file_is_no_gpu_signal(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    readings = tmp_path / "gpus.json"
    if content is not None:
        readings.write_text(content)
    with pytest.raises(GpuUnavailable, match="scripted source") as info:
        ScriptedNvmlSource(readings).readings()
    assert reason in str(info.value)


def test_pynvml_source_on_this_machine() -> None:
    """These machines have no GPU and no NVML library: the source must say so."""
    source = PynvmlSource()
    try:
        readings = source.readings()
    except GpuUnavailable as exc:
        assert str(exc)
        return
    finally:
        source.close()
    # On a GPU host the same test checks the readings are real numbers.
    assert all(
        r.uuid and r.total_bytes > 0 and 0 <= r.used_bytes <= r.total_bytes for r in readings
    )


def test_no_gpu_is_reported_once_and_produces_nothing(caplog: pytest.LogCaptureFixture) -> None:
    adapter = GpuAdapter("b0", PynvmlSource(), interval=0.5)
    with caplog.at_level(logging.INFO, logger="meshgate.adapters.gpu"):
        polls = [adapter.poll_once() for _ in range(3)]
    if adapter.no_signal is None:
        pytest.skip("this host has a GPU")
    assert polls == [[], [], []]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("backend b0: no GPU signal: NVML")


def test_signal_coming_back_is_logged_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    readings = tmp_path / "gpus.json"
    adapter = GpuAdapter("b0", ScriptedNvmlSource(readings))
    with caplog.at_level(logging.INFO, logger="meshgate.adapters.gpu"):
        assert adapter.poll_once() == []
        assert adapter.no_signal is not None
        script(readings, ("GPU-a", 1, 2, 0.5))
        assert len(adapter.poll_once()) == 1
    assert adapter.no_signal is None
    assert [r.getMessage().split(":")[1].strip() for r in caplog.records] == [
        "no GPU signal",
        "GPU signal back (1 GPUs)",
    ]


@pytest.mark.parametrize(
    ("interval", "trusted_for"), [(0.1, 1.0), (0.25, 1.0), (0.5, 2.0), (2.0, 8.0)]
)
def test_readings_are_trusted_for_four_polls_and_at_least_a_second(
    tmp_path: Path, interval: float, trusted_for: float
) -> None:
    """As a scrape's: a push delayed by a few hundred ms on a loaded host must not make a
    sidecar polling every 0.1 s stale (stale counts as saturated)."""
    readings = tmp_path / "gpus.json"
    script(readings, ("GPU-a", 1, 2, 0.5))
    adapter = GpuAdapter("b0", ScriptedNvmlSource(readings), interval=interval)
    assert [d.max_age for d in adapter.poll_once()] == [trusted_for]


async def test_run_feeds_the_sink_until_stopped(tmp_path: Path) -> None:
    readings = tmp_path / "gpus.json"
    script(readings, ("GPU-a", 1, 2, 0.5))
    adapter = GpuAdapter("b0", ScriptedNvmlSource(readings), interval=0.02)
    stop = asyncio.Event()
    received: list[Delta] = []

    def sink(delta: Delta) -> None:
        received.append(delta)
        if len(received) == 3:
            stop.set()

    await asyncio.wait_for(adapter.run(sink, stop), timeout=5)
    assert len(received) == 3
    assert received[0].changes() == {
        "vram_used_bytes": 1,
        "vram_total_bytes": 2,
        "utilization": 0.5,
    }
    assert [d.changes() for d in received[1:]] == [{}, {}]


# -- the sidecar -----------------------------------------------------------------------


@dataclass
class Receiver:
    """Stands in for the gateway's /admin/deltas: checks the token, records batches."""

    url: str
    accepted: list[Delta] = field(default_factory=list)
    rejected: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.rejected += 1
            return web.json_response({"error": {"type": "unauthorized"}}, status=401)
        try:
            self.accepted += deltas_from_json(await request.json())
        except ValueError as exc:
            return web.json_response(
                {"error": {"type": "invalid", "message": str(exc)}}, status=400
            )
        return web.Response(status=204)

    def latest(self, uuid: str) -> dict[str, Any]:
        """The receiver's view of one GPU: every change applied in order."""
        state: dict[str, Any] = {}
        for delta in self.accepted:
            if isinstance(delta, GpuStateDelta) and delta.gpu == uuid:
                state.update(delta.changes())
        return state


async def start_receiver(port: int) -> tuple[Receiver, web.AppRunner]:
    receiver = Receiver(f"http://127.0.0.1:{port}/admin/deltas")
    app = web.Application()
    app.router.add_post("/admin/deltas", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return receiver, runner


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv, runner = await start_receiver(free_port())
    try:
        yield recv
    finally:
        await runner.cleanup()


SIDECAR = """
import argparse, sys
from adapters import gpu
parser = argparse.ArgumentParser()
gpu.add_arguments(parser)
sys.exit(gpu.main(parser.parse_args(sys.argv[1:])))
"""


async def start_sidecar(url: str, token: str, readings: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SIDECAR,
        "--backend-id",
        "gpu-host-1",
        "--push",
        url,
        "--token",
        token,
        "--interval",
        "0.1",
        "--scripted-source",
        str(readings),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def stop_sidecar(
    process: asyncio.subprocess.Process, signum: int = signal.SIGTERM
) -> tuple[int, str]:
    if process.returncode is None:
        process.send_signal(signum)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=10)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    """Poll ``condition()`` every 50 ms until true; fail after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


async def test_sidecar_pushes_deltas_with_the_token(tmp_path: Path, receiver: Receiver) -> None:
    readings = tmp_path / "gpus.json"
    script(readings, ("GPU-a", 2 * GiB, 24 * GiB, 0.1))
    process = await start_sidecar(receiver.url, TOKEN, readings)
    try:
        await wait_for(lambda: receiver.latest("GPU-a").get("utilization") == 0.1)
        assert receiver.latest("GPU-a") == {
            "vram_used_bytes": 2 * GiB,
            "vram_total_bytes": 24 * GiB,
            "utilization": 0.1,
        }
        assert {d.backend for d in receiver.accepted} == {"gpu-host-1"}
        # The file changes while the sidecar runs: the change arrives, alone.
        script(readings, ("GPU-a", 5 * GiB, 24 * GiB, 0.1))
        await wait_for(lambda: receiver.latest("GPU-a").get("vram_used_bytes") == 5 * GiB)
        assert {"vram_used_bytes": 5 * GiB} in [d.changes() for d in receiver.accepted]
    finally:
        code, output = await stop_sidecar(process)
    assert code == 0, output
    assert receiver.rejected == 0
    times = [d.observed_at for d in receiver.accepted]
    assert times == sorted(times)


async def test_sidecar_with_a_wrong_token_is_rejected_and_keeps_running(
    tmp_path: Path, receiver: Receiver
) -> None:
    readings = tmp_path / "gpus.json"
    script(readings, ("GPU-a", 1, 2, 0.0))
    process = await start_sidecar(receiver.url, "wrong-token", readings)
    try:
        await wait_for(lambda: receiver.rejected >= 3)
        assert process.returncode is None
    finally:
        code, output = await stop_sidecar(process, signal.SIGINT)
    assert code == 0, output
    assert receiver.accepted == []
    # One warning for the whole streak of rejections.
    assert output.count("HTTP 401") == 1, output


async def test_sidecar_survives_the_gateway_being_down(tmp_path: Path) -> None:
    readings = tmp_path / "gpus.json"
    script(readings, ("GPU-a", 7, 8, 0.5))
    port = free_port()
    process = await start_sidecar(f"http://127.0.0.1:{port}/admin/deltas", TOKEN, readings)
    runner = None
    try:
        await asyncio.sleep(0.5)  # several failed pushes
        assert process.returncode is None
        receiver, runner = await start_receiver(port)
        # The gateway came up after the first full report was lost: it gets one anyway.
        await wait_for(lambda: receiver.latest("GPU-a") != {})
        assert receiver.latest("GPU-a") == {
            "vram_used_bytes": 7,
            "vram_total_bytes": 8,
            "utilization": 0.5,
        }
    finally:
        code, output = await stop_sidecar(process)
        if runner is not None:
            await runner.cleanup()
    assert code == 0, output
    assert output.count("failed: ClientConnectorError") == 1, output


def test_sidecar_refuses_to_start_without_a_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(gpu.TOKEN_ENV, raising=False)
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    assert gpu.main(parser.parse_args(["--backend-id", "b", "--push", "http://127.0.0.1:1/x"])) == 2
    assert "--token or $MESHGATE_ADMIN_TOKEN is required" in capsys.readouterr().err


async def test_backlog_is_bounded_while_the_gateway_is_down() -> None:
    async with aiohttp.ClientSession() as session:
        pusher = DeltaPusher(f"http://127.0.0.1:{free_port()}/admin/deltas", TOKEN, session)
        batch = [
            GpuStateDelta("b0", f"GPU-{i}", 1_700_000_000.0 + i, 2.0)
            for i in range(BACKLOG_LIMIT + 10)
        ]
        assert not await pusher.push(batch)
        assert not await pusher.push(batch[:5])
    assert pusher.backlog == BACKLOG_LIMIT
