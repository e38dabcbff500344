"""The benchmark harness keeps working: `bench.run --quick` runs every scenario at toy sizes.

No thresholds here (the numbers depend on the machine); this only proves that the servers
start and stop, the clients parse every transport, and the table is written. The run is a
child process in its own process group, so whatever happens, killing the group leaves no
server behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = (
    "1. TTFT, 1 stream",
    "2. Inter-token gap, 1 stream",
    "3. Streams per worker",
    "4. Database writes per answer",
    "6. Stop",
    "7. Overload",
    "8. Soak",
)


def run_bench(*argv: str) -> str:
    """`python -m <argv>` from the checkout, in its own process group; its output, once it succeeded."""
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    process = subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killed as a whole on failure
    )
    try:
        log, _ = process.communicate(timeout=100)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the run and every server it started
            process.wait()
    assert process.returncode == 0, log
    return log


def run_quick(output: Path, *args: str) -> str:
    run_bench("bench.run", "--quick", "--output", str(output), *args)
    table = output.read_text()
    assert "scenario failed" not in table, table
    return table


def test_quick_benchmark_runs_every_scenario(tmp_path: Path) -> None:
    table = run_quick(tmp_path / "latest.md")
    for scenario in SCENARIOS:
        assert f"| {scenario}" in table, f"no {scenario!r} row:\n{table}"
    assert "Command: `" in table and "Machine: " in table and "Versions: Python" in table


def run_quick_on_cluster(output: Path, scenario: str) -> str:
    """An opt-in scenario's quick table; skipped where Redis or PostgreSQL is not running."""
    table = run_quick(output, "--scenario", scenario)
    if "| not run |" in table:
        pytest.skip("Redis or PostgreSQL is not running: " + table.rsplit("| not run |", 1)[1][:200])
    return table


def test_quick_scale_out_benchmark_runs_where_redis_and_postgres_are(tmp_path: Path) -> None:
    table = run_quick_on_cluster(tmp_path / "workers.md", "workers")
    assert "| 3b. Scale-out: 2 × 20 tok/s | 1 worker, " in table, table
    assert "| 3b. Scale-out: 2 × 20 tok/s | 2 workers, " in table, table
    assert table.count("errors 0; lost frames 0") == 2, table


def test_quick_soak_on_postgres_and_redis_runs_where_they_are(tmp_path: Path) -> None:
    table = run_quick_on_cluster(tmp_path / "soak-cluster.md", "soak-cluster")
    assert "| 8b. Soak (PostgreSQL + Redis log): 40 answers" in table, table
    assert "; 0 failed |" in table, table


@pytest.mark.parametrize("trace", [False, True], ids=["rss", "tracemalloc"])
def test_the_memory_benchmark_holds_streams_open_and_reports_per_stream(trace: bool) -> None:
    argv = ["bench.memory", "--streams", "3", "--tokens", "20", "--interval", "0.02", "--ramp", "0.1"]
    log = run_bench(*argv, *(["--trace"] if trace else []))
    assert "3 SSE streams of 20 tokens (20 ms apart) opened over 0.1 s, 3 whole" in log, log
    assert "KiB per open stream" in log, log
    assert ("KiB of Python objects per open stream" in log) is trace, log
