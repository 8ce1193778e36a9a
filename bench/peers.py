"""Peers for the scenario benchmarks: Debian's nginx as a plain reverse proxy in front of
Triton servers' HTTP ports, one listener per load-balancing method.

nginx is installed with apt-get (package ``nginx-light``) when it is not on the machine;
that needs root, as on the project's machines.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from gateway.local_triton import TritonFleet, find_free_port_base
from tests.conftest import free_port
from tests.e2e.conftest import MODEL_REPOSITORY, Gateway, http_status, start_gateway, stop_gateway

NGINX_PACKAGE = "nginx-light"
# nginx's upstream directive per method; round-robin is nginx's default, so it has none.
BALANCING = {"least_conn": "least_conn;", "round_robin": ""}
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


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


class NginxPeer:
    """nginx on 127.0.0.1 with one listener per method in ``methods``, proxying to
    ``upstreams`` (``host:port`` of Triton HTTP endpoints); a context manager that starts
    it (waiting until every listener accepts) and stops it. ``urls`` maps method to base URL.
    """

    def __init__(self, upstreams: Sequence[str], methods: Sequence[str], workdir: Path) -> None:
        self.workdir = workdir
        self.ports = {method: free_port() for method in methods}
        self.urls = {method: f"http://127.0.0.1:{port}" for method, port in self.ports.items()}
        self._config = nginx_config(upstreams, self.ports, workdir)
        self._process: subprocess.Popen[bytes] | None = None

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
        )
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Fast shutdown (SIGTERM), then SIGKILL if it lingers. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _wait_listening(self) -> None:
        assert self._process is not None, "started"
        deadline = time.monotonic() + _START_TIMEOUT_S
        for port in self.ports.values():
            while not _accepts(port):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    log = (self.workdir / "error.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"nginx did not start listening on {port}: {log}")
                time.sleep(0.05)


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
    deadline = time.monotonic() + 60
    while http_status(f"{gateway.url}/v2/models/{model}/ready") != 200:
        if time.monotonic() > deadline:
            stop_gateway(gateway)
            fleet.stop()
            raise RuntimeError(f"the gateway never found {model} ready")
        time.sleep(0.2)
    return fleet, gateway
