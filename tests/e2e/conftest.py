"""One real Triton fleet and one real gateway process per test session.

The fleet is 2 `tritonserver` processes on `model_repository/`; the gateway is
`meshgate serve` in its own process, reached over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
from tests.conftest import free_port, limit_open_files

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


def wait_model_ready(gateway_url: str, model: str, deadline: float) -> None:
    """Return once the gateway at ``gateway_url`` has ``model`` ready; RuntimeError after
    ``deadline`` (``time.monotonic()``)."""
    while http_status(f"{gateway_url}/v2/models/{model}/ready") != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway at {gateway_url} never found {model} ready")
        time.sleep(0.2)


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


# How a gateway reaches a backend: over Triton's HTTP endpoint where it can (the
# backend URL names it), or over gRPC alone. Fixtures parametrised over both use these.
UPSTREAMS = ("http", "grpc")


def backend_over(server: TritonServer, upstream: str) -> str:
    """``server`` as a ``--backend`` URL whose calls go over ``upstream`` (UPSTREAMS)."""
    return server.backend_url if upstream == "http" else f"grpc://{server.grpc_url}"


def start_gateway(
    backends: list[str],
    log_path: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    open_files: int | None = None,
) -> Gateway:
    """Start `meshgate serve` (``env``: added to the environment; ``open_files``: its
    soft limit on open files at start) and wait until it answers /v2/health/live."""
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
        # One process, whatever the cores: a test that wants workers passes --workers N.
        "--workers",
        "1",
        *extra,
    ]
    for backend in backends:
        args += ["--backend", backend]
    log = log_path.open("wb")
    process = subprocess.Popen(
        args,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        preexec_fn=None if open_files is None else lambda: limit_open_files(open_files),
    )
    gateway = Gateway(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + 30
    while http_status(gateway.url + "/v2/health/live") != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            stop_gateway(gateway)
            raise RuntimeError(f"gateway did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    return gateway


def wait_for_workers(gateway: Gateway, workers: int, model: str, token: str) -> None:
    """Until each of the ``workers`` processes of a ``--workers N`` gateway has answered
    with ``model`` ready (the kernel hands each new connection to one of them; the
    ``pid`` of /admin/fleet says which)."""
    request = urllib.request.Request(
        gateway.url + "/admin/fleet", headers={"Authorization": f"Bearer {token}"}
    )
    deadline = time.monotonic() + 60
    answered: set[int] = set()
    while len(answered) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers never all ready:\n{gateway.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=2) as reply:
                view = json.loads(reply.read())
        except OSError:
            view = None
        if view and any(b["models"].get(model, {}).get("ready") for b in view["backends"]):
            answered.add(view["pid"])
        else:
            time.sleep(0.2)


def stop_gateway(gateway: Gateway) -> None:
    if gateway.process.poll() is None:
        gateway.process.terminate()
        try:
            gateway.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            gateway.process.kill()
            gateway.process.wait()


def dedicated_fleet(log_dir: Path, *extra_args: str) -> TritonFleet:
    """A fleet like the session's (2 servers on model_repository/), not yet started, for a
    test module that kills, restarts or unloads models and so must leave the session's
    fleet alone; use it as a context manager. ``extra_args`` go to every server."""
    return TritonFleet(
        count=2,
        port_base=find_free_port_base(2),
        model_repository=MODEL_REPOSITORY,
        log_dir=log_dir,
        extra_args=extra_args,
    )


def tiny_lm_variant(root: Path, **parameters: str) -> Path:
    """A model repository at ``root`` holding only a copy of tiny_lm with these config
    ``parameters`` (e.g. ``concurrent_sequences="1000"``), each replacing the config's
    value or, when the config has none by that name, added."""
    model = root / "tiny_lm"
    shutil.copytree(
        MODEL_REPOSITORY / "tiny_lm", model, ignore=shutil.ignore_patterns("__pycache__")
    )
    config = model / "config.pbtxt"
    text = config.read_text()
    for key, value in parameters.items():
        line = f'parameters {{ key: "{key}", value: {{ string_value: "{value}" }} }}'
        text, count = re.subn(rf'^parameters \{{ key: "{key}",.*$', line, text, flags=re.MULTILINE)
        if count == 0:
            text += line + "\n"
    config.write_text(text)
    return root


def admit_everything(path: Path, requests: int) -> Path:
    """A gateway config file whose admission limits and queue saturation let ``requests``
    (and a few more) be in flight at once: for tests that hold many streams open, not
    ones that shed them."""
    limit = requests + 16
    path.write_text(
        "[admission]\n"
        f"max_inflight = {limit}\nmax_inflight_hard = {limit}\n"
        f"model_max_inflight = {limit}\nmodel_max_inflight_hard = {limit}\n"
        f"[scoring]\nqueue_saturation = {limit}\n"
    )
    return path


async def tiny_lm_stream(
    session: aiohttp.ClientSession, base_url: str, max_tokens: int, *, openai: bool
) -> int:
    """One streamed tiny_lm generation through a gateway: ``/v1/chat/completions`` with
    usage when ``openai``, else ``/v2/models/tiny_lm/generate_stream``. Returns the tokens
    received (tiny_lm sends one word per token) after checking that the stream ended
    properly and that the model's own count agrees; raises AssertionError otherwise."""
    prompt = "We hold these truths"
    if openai:
        path = "/v1/chat/completions"
        body: dict[str, Any] = {
            "model": "tiny_lm",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    else:
        path = "/v2/models/tiny_lm/generate_stream"
        body = {"text_input": prompt, "max_tokens": max_tokens, "stream": True}
    text, reported, done = "", -1, False
    async with session.post(base_url + path, json=body) as reply:
        assert reply.status == 200, await reply.text()
        async for line in reply.content:
            assert not line.startswith(b"event: error"), line
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if openai:
                for choice in event["choices"]:
                    text += choice["delta"].get("content") or ""
                if event.get("usage"):
                    reported = event["usage"]["completion_tokens"]
            else:
                text += event["text_output"]
                reported = event["completion_tokens"]
    assert done or not openai, "the OpenAI stream ended without [DONE]"
    received = len(text.split())
    assert received == reported, f"received {received} tokens, the model counted {reported}"
    return received


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
