"""Benchmarks reuse the e2e session: one real Triton fleet and one gateway process."""

import pytest

from tests.e2e.conftest import gateway, run_dir, triton_fleet

__all__ = ["gateway", "run_dir", "triton_fleet"]


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """After the tables: what each benchmark recorded in ``extra_info`` (proxy CPU)."""
    session = getattr(config, "_benchmarksession", None)
    rows = [
        (b.group, b.name, b.extra_info) for b in getattr(session, "benchmarks", []) if b.extra_info
    ]
    if rows:
        terminalreporter.section("benchmark extra info")
        for group, name, info in rows:
            terminalreporter.write_line(f"{group:40s} {name:45s} {info}")
