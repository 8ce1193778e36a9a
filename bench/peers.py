"""Peers for the benchmarks: Debian's nginx as a plain reverse proxy in front of Triton
servers' HTTP ports (one listener per load-balancing method), and LiteLLM's proxy with
its ``triton`` provider; plus the CPU time of a process tree, how every proxy is charged.

nginx is installed with apt-get (package ``nginx-light``) when it is not on the machine;
that needs root, as on the project's machines. LiteLLM lives in its own venv
(``make litellm-venv``, ``.venv-litellm``): its pins would fight the gateway's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from gateway.local_triton import TritonFleet, find_free_port_base
from tests.conftest import free_port
from tests.e2e.conftest import (
    MODEL_REPOSITORY,
    REPO,
    Gateway,
    http_status,
    start_gateway,
    stop_gateway,
    wait_model_ready,
)

NGINX_PACKAGE = "nginx-light"
# nginx's upstream directive per method; round-robin is nginx's default, so it has none.
BALANCING = {"least_conn": "least_conn;", "round_robin": ""}
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
LITELLM_VENV = REPO / ".venv-litellm"
_LITELLM_START_TIMEOUT_S = 120.0  # it imports a lot: ~10 s here when the machine is quiet


class PeerUnavailable(RuntimeError):
    """A peer cannot run on this machine; the message says why, for the bench's record."""


def process_tree(pid: int) -> list[int]:
    """``pid`` and its living descendants (nginx's worker, a server's worker processes,
    Triton's Python backend stubs)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the ")" that closes the command name: state, ppid, ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # a process that ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user, system and the softirq work done on their behalf) of ``pid``
    and its living descendants.

    Summed over their threads' scheduler run time (``/proc/PID/task/TID/schedstat``,
    in nanoseconds): ``/proc/PID/stat`` gives the same total in 10 ms units, and a
    window of 1,000 requests at nginx's ~60 µs each is 6 of them (a thread that ends
    inside a window is not counted; the processes measured here keep theirs)."""
    return sum(run_time_ns(process) for process in process_tree(pid)) / 1e9


def run_time_ns(pid: int) -> int:
    """Nanoseconds the threads of ``pid`` have run (0 if it ended while we looked)."""
    total = 0
    for schedstat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(schedstat.read_text().split()[0])
        except OSError:  # a thread that ended while we looked
            continue
    return total


def ensure_nginx() -> Path:
    """The nginx binary, installed from Debian's packages first if it is absent."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found is None:
        print(f"nginx not found: installing Debian's {NGINX_PACKAGE} with apt-get", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", NGINX_PACKAGE],
        ):
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        found = shutil.which("nginx", path="/usr/sbin")
        if found is None:
            raise RuntimeError(f"{NGINX_PACKAGE} installed but no nginx binary in /usr/sbin")
    return Path(found)


def nginx_config(upstreams: Sequence[str], listeners: dict[str, int], workdir: Path) -> str:
    """One worker (the gateway is one process too); per method a listener proxying to
    every upstream over kept-alive HTTP/1.1, unbuffered so SSE events pass at once."""
    servers = "".join(f"        server {address};\n" for address in upstreams)
    blocks = []
    for method, port in listeners.items():
        blocks.append(
            f"""
    upstream {method} {{
        {BALANCING[method]}
{servers}        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{method};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            # Stream request bodies upstream: no temp files (the worker runs as an
            # unprivileged user that cannot write under the bench's directory).
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}"""
        )
    temp = workdir / "temp"
    return f"""worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_max_body_size 0;
    client_body_buffer_size 16m;
    client_body_temp_path {temp / "body"};
    proxy_temp_path {temp / "proxy"};
    fastcgi_temp_path {temp / "fastcgi"};
    uwsgi_temp_path {temp / "uwsgi"};
    scgi_temp_path {temp / "scgi"};
{"".join(blocks)}
}}
"""


class PeerProcess:
    """A peer's server process, started by a subclass's ``__enter__`` in a session of its
    own (``start_new_session=True``) so that stopping reaches its children too (nginx's
    worker, uvicorn's): SIGTERM to the group, then SIGKILL if it lingers."""

    _process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The main process; workers are its children (see process_tree_cpu_seconds)."""
        assert self._process is not None, "started"
        return self._process.pid

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class NginxPeer(PeerProcess):
    """nginx on 127.0.0.1 with one listener per method in ``methods``, proxying to
    ``upstreams`` (``host:port`` of Triton HTTP endpoints); a context manager that starts
    it (waiting until every listener accepts) and stops it. ``urls`` maps method to base URL.
    """

    def __init__(self, upstreams: Sequence[str], methods: Sequence[str], workdir: Path) -> None:
        self.workdir = workdir
        self.ports = {method: free_port() for method in methods}
        self.urls = {method: f"http://127.0.0.1:{port}" for method, port in self.ports.items()}
        self._config = nginx_config(upstreams, self.ports, workdir)
        self._process = None

    def __enter__(self) -> NginxPeer:
        binary = ensure_nginx()
        (self.workdir / "temp").mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self._config)
        log = (self.workdir / "nginx.out").open("wb")
        self._process = subprocess.Popen(
            # -e: the startup error log too, before the config's error_log applies.
            [
                str(binary),
                *("-p", str(self.workdir), "-e", str(self.workdir / "error.log")),
                *("-c", str(conf), "-g", "daemon off;"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self) -> None:
        assert self._process is not None, "started"
        deadline = time.monotonic() + _START_TIMEOUT_S
        for port in self.ports.values():
            while not _accepts(port):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    log = (self.workdir / "error.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"nginx did not start listening on {port}: {log}")
                time.sleep(0.05)


def litellm_config(triton_http_url: str, model: str) -> str:
    """One model routed by LiteLLM's ``triton`` provider to Triton's generate extension:
    chat completions go to ``.../generate``, or ``.../generate_stream`` when streaming."""
    return f"""model_list:
  - model_name: {model}
    litellm_params:
      model: triton/{model}
      api_base: {triton_http_url}/v2/models/{model}/generate
litellm_settings:
  # The triton provider maps only max_tokens; other OpenAI fields are dropped, not refused.
  drop_params: true
general_settings:
  # No key, like the gateway without tenants; the proxy listens on 127.0.0.1 only.
  dangerously_permit_weak_or_unset_master_key: true
"""


class LiteLLMPeer(PeerProcess):
    """LiteLLM's proxy (one uvicorn worker, its default) on 127.0.0.1 in front of one
    Triton server's HTTP endpoint for ``model``; a context manager that starts it (waiting
    until it answers) and stops it. Raises PeerUnavailable when ``.venv-litellm`` is
    missing."""

    def __init__(self, triton_http_url: str, model: str, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._config = litellm_config(triton_http_url, model)
        self._process = None

    @staticmethod
    def version() -> str:
        """The installed litellm version; PeerUnavailable if there is none."""
        python = LITELLM_VENV / "bin" / "python"
        if not (LITELLM_VENV / "bin" / "litellm").exists():
            raise PeerUnavailable(f"LiteLLM is not installed in {LITELLM_VENV} (make litellm-venv)")
        found = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            check=True,
            capture_output=True,
            text=True,
        )
        return found.stdout.strip()

    def __enter__(self) -> LiteLLMPeer:
        self.version()
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "litellm.yaml"
        conf.write_text(self._config)
        # The cost map is otherwise downloaded from GitHub at import; this machine has no
        # network beyond package registries.
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        env["LITELLM_DONT_SHOW_FEEDBACK_BOX"] = "true"
        log = (self.workdir / "litellm.out").open("wb")
        self._process = subprocess.Popen(
            [
                str(LITELLM_VENV / "bin" / "litellm"),
                *("--config", str(conf), "--host", "127.0.0.1", "--port", str(self.port)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + _LITELLM_START_TIMEOUT_S
            while http_status(f"{self.url}/health/liveliness") != 200:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    tail = (self.workdir / "litellm.out").read_text(errors="replace")[-2000:]
                    raise PeerUnavailable(f"LiteLLM proxy did not start: {tail}")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self


def nginx_version() -> str:
    """``nginx -v`` (it prints to stderr), e.g. ``nginx/1.22.1``."""
    found = subprocess.run([str(ensure_nginx()), "-v"], capture_output=True, text=True)
    return (found.stderr or found.stdout).strip().removeprefix("nginx version: ")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def local_fleet_and_gateway(
    servers: int, run_dir: Path, model: str, *gateway_flags: str
) -> tuple[TritonFleet, Gateway]:
    """``servers`` real Tritons on free ports and a gateway in front of them (over gRPC),
    returned once the gateway has ``model`` ready; both stopped again on failure."""
    fleet = TritonFleet(servers, find_free_port_base(servers), MODEL_REPOSITORY, run_dir)
    fleet.start()
    try:
        backends = [f"grpc://{s.grpc_url}" for s in fleet.servers]
        gateway = start_gateway(backends, run_dir / "gateway.log", *gateway_flags)
    except BaseException:
        fleet.stop()
        raise
    try:
        wait_model_ready(gateway.url, model, time.monotonic() + 60)
    except BaseException:
        stop_gateway(gateway)
        fleet.stop()
        raise
    return fleet, gateway
