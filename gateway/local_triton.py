"""Start real ``tritonserver`` processes on 127.0.0.1 for development and tests.

Server ``i`` of a fleet with port base ``P`` listens on HTTP ``P+10i``, gRPC ``P+10i+1``
and metrics ``P+10i+2``, logs to ``<log_dir>/triton-<i>.log``, and runs in its own
session so stopping it also stops its python-backend stubs. A ``tritonserver`` on PATH
(NVIDIA's container) is used as is; otherwise the binary shipped in the
``nvidia-pytriton`` wheel of the Triton venv (``.venv-triton``, or ``$MESHGATE_TRITON_VENV``)
is launched with the environment ARCHITECTURE.md ("Running Triton here") describes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parent.parent
TRITON_VENV_ENV = "MESHGATE_TRITON_VENV"
DEFAULT_TRITON_VENV = REPO_ROOT / ".venv-triton"
BACKENDS_DIR = REPO_ROOT / ".run" / "triton-backends"
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
DEFAULT_LOG_DIR = Path(".run/triton")
HOST = "127.0.0.1"
PORT_STRIDE = 10
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 5
_PR_SET_PDEATHSIG = 1
_NOT_FOUND = "tritonserver not found: run `make triton-venv` or put tritonserver on PATH"


class TritonLaunchError(RuntimeError):
    """A fleet could not start; the message is one human-readable line."""


@dataclass(frozen=True)
class TritonInstall:
    """How to launch tritonserver: the binary, its backend directory and environment."""

    binary: Path
    backend_dir: Path | None  # None: the binary's built-in default (NVIDIA's container)
    env: dict[str, str]


@dataclass(frozen=True)
class TritonServer:
    """One running server of a fleet."""

    index: int
    http_port: int
    grpc_port: int
    metrics_port: int
    model_repository: Path
    log_path: Path
    pid: int

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    @property
    def backend_url(self) -> str:
        """This server as a `meshgate serve --backend` URL: gRPC, metrics and HTTP."""
        return f"grpc://{self.grpc_url}?metrics={self.metrics_url}&http={HOST}:{self.http_port}"

    @property
    def ports(self) -> tuple[int, int, int]:
        return (self.http_port, self.grpc_port, self.metrics_port)


def server_ports(port_base: int, index: int) -> tuple[int, int, int]:
    """(HTTP, gRPC, metrics) ports of server ``index``."""
    http = port_base + PORT_STRIDE * index
    return (http, http + 1, http + 2)


def port_in_use(port: int) -> bool:
    """True if ``port`` cannot be bound on 127.0.0.1 the way tritonserver binds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as the servers use it: a TIME_WAIT leftover is not "in use".
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


def find_free_port_base(count: int, low: int = 20000, high: int = 40000) -> int:
    """A port base in [low, high) whose ``count`` servers' ports are all free right now."""
    span = PORT_STRIDE * count
    # Start at a pid-dependent offset so concurrent test runs rarely probe the same bases.
    slots = (high - low) // span
    first = os.getpid() % slots
    for step in range(slots):
        base = low + span * ((first + step) % slots)
        ports = [p for i in range(count) for p in server_ports(base, i)]
        if not any(port_in_use(p) for p in ports):
            return base
    raise TritonLaunchError(f"no free port base for {count} servers in {low}-{high}")


def _wheel_binary(venv: Path) -> Path | None:
    pattern = "lib/python3.*/site-packages/pytriton/tritonserver/bin/tritonserver"
    matches = sorted(venv.glob(pattern))
    return matches[-1] if matches else None


def _sync_file(source: Path, target: Path) -> None:
    """Copy unless an identical-looking copy exists; atomic so a running server is unaffected."""
    stat = source.stat()
    with contextlib.suppress(FileNotFoundError):
        existing = target.stat()
        if (existing.st_size, existing.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            return
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.copy2(source, partial)
    os.replace(partial, target)


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver and prepare what it needs; raises TritonLaunchError if absent."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(binary=Path(on_path), backend_dir=None, env=dict(os.environ))
    venv = Path(os.environ.get(TRITON_VENV_ENV) or DEFAULT_TRITON_VENV).resolve()
    binary = _wheel_binary(venv)
    if binary is None:
        raise TritonLaunchError(f"{_NOT_FOUND} (no nvidia-pytriton in {venv})")
    dist = binary.parent.parent  # .../pytriton/tritonserver
    site_packages = dist.parent.parent
    python_version = site_packages.parent.name.removeprefix("python")  # e.g. "3.11"
    stub = dist / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    backend = dist / "backends" / "python"
    python_dir = BACKENDS_DIR / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (
        backend / "libtriton_python.so",
        backend / "triton_python_backend_utils.py",
        stub,
    ):
        if not source.is_file():
            raise TritonLaunchError(f"incomplete nvidia-pytriton install: {source} is missing")
        _sync_file(source, python_dir / source.name)
    env = dict(os.environ)
    libs = str(site_packages / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libs, env.get("LD_LIBRARY_PATH")]))
    # The stub embeds libpython and takes its packages (numpy<2) from the first `python`
    # on PATH; an inherited PYTHONHOME/PYTHONPATH would point it at the gateway's instead.
    env["PATH"] = os.pathsep.join(filter(None, [str(venv / "bin"), env.get("PATH")]))
    env.pop("PYTHONHOME", None)
    env.pop("PYTHONPATH", None)
    return TritonInstall(binary=binary, backend_dir=BACKENDS_DIR, env=env)


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child before exec: SIGTERM it when the launching thread dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _log_tail(path: Path) -> str:
    """The last error lines of a server log (else its last lines), joined into one line."""
    with contextlib.suppress(OSError), path.open(errors="replace") as log:
        lines = [line.strip() for line in log if line.strip()]
        # Triton's own error lines start with "E<date>"; its fatal last words with "error:".
        errors = [line for line in lines if line.startswith(("E", "error:"))]
        return " | ".join((errors or lines)[-LOG_TAIL_LINES:]) or "(log is empty)"
    return "(no log)"


def _is_ready(server: TritonServer) -> bool:
    """Models ready and every endpoint serving: Triton opens its metrics port after its
    HTTP one, and a scrape in between was refused."""
    return _answers(f"{server.http_url}/v2/health/ready") and _answers(server.metrics_url)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return bool(reply.status == 200)
    except (OSError, http.client.HTTPException):  # refused, reset, or 503 while loading
        return False


class TritonFleet:
    """``count`` tritonserver processes on 127.0.0.1; a context manager that starts and stops them.

    Processes die with the thread that started them (PR_SET_PDEATHSIG), so call
    ``start``/``restart`` from a thread that lives as long as the fleet.
    """

    def __init__(
        self,
        count: int,
        port_base: int,
        model_repository: Path | Sequence[Path],
        log_dir: Path,
        *,
        startup_timeout: float = 180.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``extra_args`` are appended to every server's command line (e.g. tracing)."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if isinstance(model_repository, (str, os.PathLike)):
            repositories = [Path(model_repository)] * count
        else:
            repositories = [Path(p) for p in model_repository]
        if len(repositories) != count:
            raise ValueError(f"{len(repositories)} model repositories for {count} servers")
        last_port = server_ports(port_base, count - 1)[-1]
        if port_base < 1 or last_port > 65535:
            raise ValueError(f"ports {port_base}-{last_port} are outside 1-65535")
        self.port_base = port_base
        self.log_dir = Path(log_dir)
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self._repositories = [p.resolve() for p in repositories]
        self._install: TritonInstall | None = None
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * count
        self.servers: list[TritonServer] = []

    def __enter__(self) -> TritonFleet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start every server and wait until each is ready; on failure stop all and raise."""
        for index in range(len(self._repositories)):
            self._check_ports(index)
        self._install = find_tritonserver()
        self.servers = []
        try:
            for index in range(len(self._repositories)):
                self.servers.append(self._launch(index, fresh_log=True))
            for server in self.servers:
                self._wait_ready(server)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every server and its stubs: SIGTERM, wait, then SIGKILL. Idempotent."""
        self._terminate(range(len(self._processes)))

    def kill(self, index: int) -> None:
        """SIGKILL server ``index`` and its stubs at once, like a host dying."""
        process = self._processes[index]
        if process is not None:
            self._signal_group(process, signal.SIGKILL)
            process.wait()
            self._processes[index] = None

    def restart(self, index: int) -> None:
        """Start server ``index`` again on the same ports (stopping it first if running).

        Triton 2.51 sometimes aborts while loading python-backend models right after a
        SIGKILL of its predecessor (boost::interprocess::lock_exception); like a process
        supervisor, this tries once more when the new process dies during startup."""
        for attempt in range(2):
            self._terminate([index])
            self._check_ports(index)
            server = self._launch(index, fresh_log=False)
            self.servers[index] = server
            try:
                self._wait_ready(server)
                return
            except TritonLaunchError:
                process = self._processes[index]
                crashed = process is not None and process.poll() is not None
                self._terminate([index])
                if attempt == 1 or not crashed:
                    raise
            except BaseException:
                self._terminate([index])
                raise

    def _check_ports(self, index: int) -> None:
        for port in server_ports(self.port_base, index):
            if port_in_use(port):
                raise TritonLaunchError(
                    f"triton server {index}: port {port} on {HOST} is already in use"
                )

    def _launch(self, index: int, *, fresh_log: bool) -> TritonServer:
        assert self._install is not None, "start() locates tritonserver first"
        http, grpc, metrics = server_ports(self.port_base, index)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"triton-{index}.log"
        command = [
            str(self._install.binary),
            f"--model-repository={self._repositories[index]}",
            f"--http-address={HOST}",
            f"--http-port={http}",
            f"--grpc-address={HOST}",
            f"--grpc-port={grpc}",
            f"--metrics-address={HOST}",
            f"--metrics-port={metrics}",
            # In-flight requests get a short grace period, not the default 30 s.
            "--exit-timeout-secs=5",
        ]
        if self._install.backend_dir is not None:
            command.append(f"--backend-directory={self._install.backend_dir}")
        command += self.extra_args
        with log_path.open("wb" if fresh_log else "ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._install.env,
                start_new_session=True,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            )
        self._processes[index] = process
        return TritonServer(
            index=index,
            http_port=http,
            grpc_port=grpc,
            metrics_port=metrics,
            model_repository=self._repositories[index],
            log_path=log_path,
            pid=process.pid,
        )

    def _wait_ready(self, server: TritonServer) -> None:
        process = self._processes[server.index]
        assert process is not None, "the server was launched"
        deadline = time.monotonic() + self.startup_timeout
        while not _is_ready(server):
            code = process.poll()
            if code is not None:
                problem = f"exited with code {code} during startup"
            elif time.monotonic() > deadline:
                problem = f"not ready after {self.startup_timeout:g} s"
            else:
                time.sleep(0.2)
                continue
            raise TritonLaunchError(
                f"triton server {server.index} (http port {server.http_port}) {problem}; "
                f"log {server.log_path}: {_log_tail(server.log_path)}"
            )

    def _terminate(self, indexes: Iterable[int]) -> None:
        running = [(i, p) for i in indexes if (p := self._processes[i]) is not None]
        # Signal all first: each server takes seconds to unload its models.
        for _, process in running:
            self._signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for index, process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()
            # Stubs still alive after their server exited are stragglers.
            self._signal_group(process, signal.SIGKILL)
            self._processes[index] = None

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
        # The server leads its own session, so its pid is the group id of it and its stubs.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `meshgate triton`."""
    parser.add_argument("--count", type=int, default=2, help="number of servers (default 2)")
    parser.add_argument(
        "--port-base",
        type=int,
        default=18000,
        help="server i listens on HTTP P+10i, gRPC P+10i+1, metrics P+10i+2 (default 18000)",
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=DEFAULT_MODEL_REPOSITORY,
        help=f"model repository served by every server (default {DEFAULT_MODEL_REPOSITORY})",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=DEFAULT_LOG_DIR,
        help=f"one log file per server (default {DEFAULT_LOG_DIR})",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=180.0,
        help="seconds each server may take to become ready (default 180)",
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    """`meshgate triton`: run a fleet until SIGINT/SIGTERM; 2 if it cannot start."""
    # SIGINT too: a shell starts background jobs with SIGINT ignored.
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, _interrupt) for signum in stop_signals}
    try:
        fleet = TritonFleet(
            args.count,
            args.port_base,
            args.model_repository,
            args.log_dir,
            startup_timeout=args.startup_timeout,
        )
        with fleet:
            for s in fleet.servers:
                print(
                    f"triton {s.index}: http {s.http_url} grpc {s.grpc_url} "
                    f"metrics {s.metrics_url} pid {s.pid} log {s.log_path}",
                    flush=True,
                )
            while True:
                signal.pause()
    except (TritonLaunchError, ValueError) as exc:
        print(f"meshgate triton: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
