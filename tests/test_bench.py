"""Every benchmark script still runs: each with tiny parameters, its report printed, exit 0.
(The figures themselves are read by people, not asserted: see bench/README.md.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services import require

pytestmark = pytest.mark.slow(reason="runs the benchmarks' smoke modes: processes, wrk, nginx")

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                            timeout=170, cwd=BENCH.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_proxy_bench_quick() -> None:
    require("wrk")
    require("nginx")
    out = _run(str(BENCH / "proxy_bench.py"), "--quick")
    assert "ollama-metrics" in out and "ratio vs nginx" in out


def test_failure_modes_bench_quick() -> None:
    out = _run(str(BENCH / "failure_modes.py"), "--quick")
    for row in ("FM17", "FM18", "FM19"):
        assert out.count(row) == 2, out  # its row of the table and its PASS/MISS line


def test_workers_bench_quick() -> None:
    require("wrk")
    require("nginx")
    out = _run(str(BENCH / "workers_bench.py"), "--quick")
    for row in ("nginx-1", "nginx-2", "ollama-metrics-1", "ollama-metrics-2",
                "2 workers / 1"):
        assert row in out, out
