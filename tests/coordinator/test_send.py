"""`edge-coordinator send` against a real `edge-agent` process: result, journal, timeout."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .support import ROOT, CoordinatorProcess, cli, wait_until

pytestmark = pytest.mark.slow


def test_send_gets_signed_result_then_times_out_cleanly_when_agent_is_gone(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    coordinator.init("cmd-a").start()
    home = tmp_path / "agent-home"
    enroll = subprocess.run([sys.executable, "-m", "agent.cli", "--data-dir", str(home), "enroll", "--bundle",
                             str(coordinator.bundle("cmd-a"))], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert enroll.returncode == 0, enroll.stderr
    log = open(tmp_path / "agent.log", "ab")
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "--data-dir", str(home), "run", "--interval", "1"],
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        wait_until(lambda: coordinator.readings() >= 1, 60, "the agent's first reading")
        out = cli("send", "--data-dir", str(coordinator.data_dir), "cmd-a", "set_interval", "2.5", "--timeout", "30", "--json")
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert reply["status"] == "SUCCESS" and reply["result"] == {"interval": 2.5}
        # the agent reports the execution back (edge.command_result), journaled under its identity
        wait_until(lambda: coordinator.query(
            "SELECT agent_id, command, status FROM command_results WHERE command_task_id = ?", (reply["task_id"],)),
            60, "the command result journaled")
        assert coordinator.query("SELECT agent_id, status FROM command_results WHERE command_task_id = ?",
                                 (reply["task_id"],)) == [("cmd-a", "SUCCESS")]
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    # the agent's persistent session keeps its queue: the command waits, send times out with one clear line
    out = cli("send", "--data-dir", str(coordinator.data_dir), "cmd-a", "status", "--timeout", "3")
    assert out.returncode == 4 and "Traceback" not in out.stderr, out.stderr  # security.exit_codes.TIMEOUT
    assert "no result from 'cmd-a'" in out.stderr and "within 3s" in out.stderr and out.stderr.count("\n") == 1
    assert "stays queued" in out.stderr and "edge-coordinator result " in out.stderr
