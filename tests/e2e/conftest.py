"""One real Triton fleet and one real gateway process per test session.

The fleet is 2 `tritonserver` processes on `model_repository/`; the gateway is
`meshgate serve` in its own process, reached over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.local_triton import TritonFleet, TritonServer, find_free_port_base
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO / "model_repository"
# Small enough that the 413 test stays cheap, large enough for 4 MiB tensors.
GATEWAY_MAX_BODY = 8 * 1024 * 1024
SESSION_ADMIN_TOKEN = "session-admin-token"


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def triton_metric(server: TritonServer, name: str, model: str) -> float:
    """One model's sample of a metric, read from the server's metrics port."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    pattern = rf'^{name}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"{name} for {model} not on {server.metrics_url}"
    return float(found.group(1))


async def admin_fleet(gateway: Gateway, token: str = SESSION_ADMIN_TOKEN) -> dict[str, Any]:
    """The gateway's /admin/fleet view."""
    async with aiohttp.ClientSession() as session:
        async with session.get(
            gateway.url + "/admin/fleet", headers={"Authorization": f"Bearer {token}"}
        ) as reply:
            assert reply.status == 200, await reply.text()
            view: dict[str, Any] = await reply.json()
    return view


def total_inflight(view: dict[str, Any]) -> float:
    """In-flight requests the gateway counts, over every model and every slot."""
    admitted = sum(m["inflight"] for m in view["models"].values())
    dispatched = sum(s["inflight"] for b in view["backends"] for s in b["models"].values())
    return admitted + dispatched


def start_gateway(backends: list[str], log_path: Path, *extra: str) -> Gateway:
    """Start `meshgate serve` and wait until it answers /v2/health/live."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--port",
        str(port),
        "--discovery-interval",
        "0.5",
        *extra,
    ]
    for backend in backends:
        args += ["--backend", backend]
    log = log_path.open("wb")
    process = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    gateway = Gateway(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + 30
    while http_status(gateway.url + "/v2/health/live") != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            stop_gateway(gateway)
            raise RuntimeError(f"gateway did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    return gateway


def stop_gateway(gateway: Gateway) -> None:
    if gateway.process.poll() is None:
        gateway.process.terminate()
        try:
            gateway.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            gateway.process.kill()
            gateway.process.wait()


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def triton_fleet(run_dir: Path) -> Iterator[TritonFleet]:
    fleet = TritonFleet(
        count=2,
        port_base=find_free_port_base(2),
        model_repository=MODEL_REPOSITORY,
        log_dir=run_dir / "triton",
    )
    with fleet:
        yield fleet


@pytest.fixture(scope="session")
def gateway(triton_fleet: TritonFleet, run_dir: Path) -> Iterator[Gateway]:
    backends = [s.backend_url for s in triton_fleet.servers]
    gw = start_gateway(
        backends,
        run_dir / "gateway.log",
        "--max-body-bytes",
        str(GATEWAY_MAX_BODY),
        "--admin-token",
        SESSION_ADMIN_TOKEN,
    )
    try:
        deadline = time.monotonic() + 60
        while http_status(gw.url + "/v2/models/tiny_lm/ready") != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"models never became ready:\n{gw.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield gw
    finally:
        stop_gateway(gw)
        if os.environ.get("MESHGATE_SHOW_GATEWAY_LOG"):
            print(gw.log_path.read_text())
