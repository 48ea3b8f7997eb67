"""`edge-coordinator demo` end to end: real daemon, real `edge-agent` processes, `send`, `edge-audit verify`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_demo_runs_real_agents_dispatches_commands_and_verifies(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "demo", "--agents", "2", "--duration", "8", "--interval", "0.5",
         "--data-dir", str(tmp_path / "demo")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "started 2 agents (edge-agent)" in out
    assert "send sensor-1 sample_now  -> SUCCESS" in out and "send sensor-2 set_interval 1.0 -> SUCCESS" in out
    assert "RESULT: all records verified" in out
    table = [line.split() for line in out.splitlines() if line.strip().startswith("sensor-")]
    assert len(table) == 2 and all(int(row[1]) > 0 and int(row[-1]) == sum(map(int, row[1:-1])) for row in table), table
    # nothing left running from the demo
    run_dir = tmp_path / "demo" / "coordinator" / "run"
    assert not (run_dir / "coordinator.pid").exists()
    pid = int((run_dir / "mosquitto" / "mosquitto.pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or b"mosquitto" not in Path(f"/proc/{pid}/cmdline").read_bytes()
