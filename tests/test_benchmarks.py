"""The benchmark suite runs (its figures are measured by `python -m benchmarks`, not asserted here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.timeout(360)  # beyond the run's own 300 s bound, which says more when it is crossed
def test_quick_benchmarks_run_and_print_a_table() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| figure" in done.stdout and "kernel_demo: execute `1+1` round trip" in done.stdout
