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

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = (
    "1. TTFT, 1 stream",
    "2. Inter-token gap, 1 stream",
    "3. Streams per worker",
    "4. Database writes per answer",
    "6. Stop",
)


def test_quick_benchmark_runs_every_scenario(tmp_path: Path) -> None:
    output = tmp_path / "latest.md"
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.run", "--quick", "--output", str(output)],
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
    table = output.read_text()
    assert "scenario failed" not in table, table
    for scenario in SCENARIOS:
        assert f"| {scenario}" in table, f"no {scenario!r} row:\n{table}"
    assert "Command: `" in table and "Machine: " in table and "Versions: Python" in table
