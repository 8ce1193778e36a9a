"""Benchmarks reuse the e2e session: one real Triton fleet and one gateway process."""

from tests.e2e.conftest import gateway, run_dir, triton_fleet

__all__ = ["gateway", "run_dir", "triton_fleet"]
