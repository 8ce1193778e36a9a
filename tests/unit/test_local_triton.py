"""gateway.local_triton without a real Triton: ports, locating the binary, failure paths.

Failure paths run small shell scripts standing in for ``tritonserver`` so that the
cleanup of whole process groups is exercised on real processes.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import local_triton
from gateway.local_triton import TritonFleet, TritonLaunchError


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.fixture
def no_triton(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No tritonserver on PATH and an empty Triton venv."""
    empty = tmp_path / "empty-venv"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.setenv(local_triton.TRITON_VENV_ENV, str(empty))


def _fake_tritonserver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Put an executable shell script named tritonserver first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    binary = bin_dir / "tritonserver"
    binary.write_text("#!/bin/sh\n" + script)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _alive(pid: int) -> bool:
    """True if pid is a live process (zombies count as dead: nobody may reap them here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_ports_follow_the_layout() -> None:
    assert local_triton.server_ports(18000, 0) == (18000, 18001, 18002)
    assert local_triton.server_ports(18000, 3) == (18030, 18031, 18032)


def test_port_in_use_is_detected(busy_port: int) -> None:
    assert local_triton.port_in_use(busy_port)


def test_free_port_base_has_free_ports() -> None:
    base = local_triton.find_free_port_base(2)
    assert 20000 <= base < 40000
    ports = [*local_triton.server_ports(base, 0), *local_triton.server_ports(base, 1)]
    assert not any(local_triton.port_in_use(port) for port in ports)


@pytest.fixture
def busy_grpc_port_base() -> Iterator[int]:
    """A port base whose server 0 finds its HTTP port free and its gRPC port taken (a
    port next to an arbitrary busy one may itself be in use: a client's, say)."""
    base = local_triton.find_free_port_base(1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        # As find_free_port_base probes: a TIME_WAIT leftover on the port is no obstacle.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", local_triton.server_ports(base, 0)[1]))
        listener.listen()
        yield base


def test_busy_port_fails_before_launch(busy_grpc_port_base: int, tmp_path: Path) -> None:
    busy_port = local_triton.server_ports(busy_grpc_port_base, 0)[1]
    fleet = TritonFleet(1, busy_grpc_port_base, tmp_path, tmp_path / "logs")
    with pytest.raises(TritonLaunchError, match=f"port {busy_port} .*already in use") as info:
        fleet.start()
    assert "\n" not in str(info.value)
    assert not (tmp_path / "logs").exists(), "nothing may be launched"


@pytest.mark.usefixtures("no_triton")
def test_missing_binary_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(TritonLaunchError, match="tritonserver not found: run `make triton-venv`"):
        local_triton.find_tritonserver()
    fleet = TritonFleet(1, local_triton.find_free_port_base(1), tmp_path, tmp_path / "logs")
    with pytest.raises(TritonLaunchError, match="tritonserver not found"):
        fleet.start()


def test_tritonserver_on_path_is_used_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_tritonserver(tmp_path, monkeypatch, "exit 0\n")
    install = local_triton.find_tritonserver()
    assert install.binary == tmp_path / "bin" / "tritonserver"
    assert install.backend_dir is None
    assert install.env["PATH"] == os.environ["PATH"]


def test_wheel_install_gets_backend_dir_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "venv"
    site = venv / "lib" / "python3.9" / "site-packages"
    dist = site / "pytriton" / "tritonserver"
    files = {
        dist / "bin" / "tritonserver": b"server",
        dist / "backends" / "python" / "libtriton_python.so": b"backend",
        dist / "backends" / "python" / "triton_python_backend_utils.py": b"utils",
        dist / "python_backend_stubs" / "3.8" / "triton_python_backend_stub": b"stub 3.8",
        dist / "python_backend_stubs" / "3.9" / "triton_python_backend_stub": b"stub 3.9",
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.setenv(local_triton.TRITON_VENV_ENV, str(venv))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(local_triton, "BACKENDS_DIR", tmp_path / "backends")

    install = local_triton.find_tritonserver()

    assert install.binary == dist / "bin" / "tritonserver"
    assert install.backend_dir == tmp_path / "backends"
    python = tmp_path / "backends" / "python"
    assert (python / "triton_python_backend_stub").read_bytes() == b"stub 3.9"
    assert (python / "libtriton_python.so").read_bytes() == b"backend"
    assert (python / "triton_python_backend_utils.py").read_bytes() == b"utils"
    assert install.env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(site / "nvidia_pytriton.libs")
    assert install.env["PATH"].split(os.pathsep)[0] == str(venv / "bin")
    assert "PYTHONPATH" not in install.env


def test_server_exiting_at_startup_reports_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_tritonserver(
        tmp_path, monkeypatch, 'echo "error: creating server: failed to load all models"\nexit 1\n'
    )
    base = local_triton.find_free_port_base(1)
    fleet = TritonFleet(1, base, tmp_path, tmp_path / "logs")
    with pytest.raises(TritonLaunchError) as info:
        fleet.start()
    message = str(info.value)
    assert message.startswith(f"triton server 0 (http port {base}) exited with code 1")
    assert "failed to load all models" in message
    assert "\n" not in message


def test_startup_timeout_stops_the_whole_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child_pid_file = tmp_path / "child.pid"
    # Like tritonserver and its stubs: a server process with a child of its own.
    _fake_tritonserver(
        tmp_path, monkeypatch, f'sleep 60 &\necho $! > "{child_pid_file}"\nwait\n'
    )
    fleet = TritonFleet(
        1, local_triton.find_free_port_base(1), tmp_path, tmp_path / "logs", startup_timeout=0.5
    )
    with pytest.raises(TritonLaunchError, match=r"not ready after 0\.5 s"):
        fleet.start()
    child = int(child_pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    fleet.stop()  # idempotent


def test_main_prints_one_error_line(
    busy_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    local_triton.add_arguments(parser)
    args = parser.parse_args(
        ["--count", "1", "--port-base", str(busy_port), "--log-dir", str(tmp_path / "logs")]
    )
    assert local_triton.main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("meshgate triton: error: ")
    assert str(busy_port) in err
