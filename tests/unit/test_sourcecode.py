"""Lint and types are part of the suite (asyncpg's tests/test__sourcecode.py habit)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_clean() -> None:
    result = _run(
        str(BIN / "ruff"),
        "check",
        "gateway",
        "fastpath",
        "adapters",
        "tests",
        "bench",
        "model_repository",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean() -> None:
    result = _run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr
