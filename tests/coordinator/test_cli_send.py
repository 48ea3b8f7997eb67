"""`edge-coordinator send` / `result` as an operator uses them: `celery call`-like
arguments, checked before anything is sent, the help's examples run as written, and
one exit code per outcome (security.exit_codes)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from security import exit_codes
from tests.support.cli import one_line_error

from .support import ROOT, CoordinatorProcess, cli, wait_until

AGENT = "pi-01"  # the agent id the help's examples use



@pytest.mark.parametrize("argv, needle", [
    (["set_interval", "abc"], 'seconds="abc" is not a number'),
    (["set_interval", "1", "2", "3"], "takes 1 argument(s), 3 given"),
    (["set_interval"], "missing argument 'seconds'"),
    (["status", "-k", "top=3"], "has no argument 'top'"),
    (["sample_now", "--kwargs", "[1]"], "--kwargs must be a JSON object"),
    (["sample_now", "-k", "sensor"], "use -k name=value"),
    (["reboot"], "unknown command 'reboot'"),
])
def test_bad_arguments_are_a_usage_error_before_anything_is_sent(tmp_path: Path, argv: list[str], needle: str) -> None:
    # no data dir exists: the check happens before the config, the journal or the broker
    out = cli("send", "--data-dir", str(tmp_path / "none"), AGENT, *argv)
    one_line_error(out, exit_codes.USAGE, needle)
    assert not (tmp_path / "none").exists()


def send_examples() -> list[str]:
    out = cli("send", "--help")
    assert out.returncode == 0, out.stderr
    lines = [line.strip() for line in out.stdout.splitlines()]
    examples = [line for line in lines if line.startswith(("edge-coordinator ", "ID=$(edge-coordinator"))]
    assert len(examples) >= 5, out.stdout
    return examples


def shell(line: str, data_dir: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a help example exactly as written, with the installed console scripts on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "EDGE_COORDINATOR_DATA_DIR": str(data_dir)}
    return subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


class Agent:
    def __init__(self, coordinator: CoordinatorProcess, name: str, home: Path) -> None:
        self.home, self.name, self.proc = home, name, None
        out = subprocess.run([sys.executable, "-m", "agent.cli", "--data-dir", str(home), "enroll", "--bundle",
                              str(coordinator.bundle(name))], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr

    def start(self) -> None:
        log = open(self.home.parent / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "--data-dir", str(self.home), "run",
                                      "--interval", "1"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
def test_send_and_result_against_a_real_agent(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    coordinator.init(AGENT, "idle", "gone").start()
    out = cli("revoke", "--data-dir", str(coordinator.data_dir), "gone")
    assert out.returncode == 0, out.stderr
    agent = Agent(coordinator, AGENT, tmp_path / "pi-home")
    data = str(coordinator.data_dir)
    agent.start()
    try:
        wait_until(lambda: coordinator.readings() >= 1, 90, "the agent's first reading")
        for line in send_examples():
            run = shell(line, coordinator.data_dir)
            assert run.returncode == 0 and "Traceback" not in run.stderr, (line, run.stdout, run.stderr)
        # readable default: status line + result; --json: one document
        out = cli("send", "--data-dir", data, AGENT, "set_interval", "-k", "seconds=1.5")
        assert out.returncode == 0, out.stderr
        assert re.match(r"SUCCESS  edge\.agent\.set_interval on pi-01 \(task [0-9a-f-]{36}, ", out.stdout), out.stdout
        assert json.loads(out.stdout.split("\n", 1)[1]) == {"interval": 1.5}
        out = cli("send", "--data-dir", data, AGENT, "sample_now", "simulated", "--json")
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert reply["status"] == "SUCCESS" and {r["sensor"] for r in reply["result"]} == {"sim_temp"}
        # runs on the device and fails there: TASK_FAILED, the device's reason shown
        out = cli("send", "--data-dir", data, AGENT, "set_interval", "0.001", "--json")
        assert out.returncode == exit_codes.TASK_FAILED, out.stderr
        assert json.loads(out.stdout)["status"] == "FAILURE" and "too small" in json.loads(out.stdout)["result"]
        # beyond the signing layer's max_delay_seconds: refused at send time, nothing recorded
        before = coordinator.query("SELECT COUNT(*) FROM commands")
        out = cli("send", "--data-dir", data, AGENT, "set_interval", "5", "--countdown", str(3 * 86400))
        one_line_error(out, exit_codes.USAGE, "max_delay_seconds")
        assert coordinator.query("SELECT COUNT(*) FROM commands") == before
        # revoked and never-connected agents: one line each, NOT_DELIVERED
        one_line_error(cli("send", "--data-dir", data, "gone", "status"), exit_codes.NOT_DELIVERED, "'gone' is revoked")
        one_line_error(cli("send", "--data-dir", data, "idle", "status"), exit_codes.NOT_DELIVERED, "not connected")
        one_line_error(cli("send", "--data-dir", data, "nobody", "status"), exit_codes.NOT_DELIVERED, "not enrolled")
    finally:
        agent.stop()
    # the agent is offline: the command waits in its session, send times out saying how to get it later
    out = cli("send", "--data-dir", data, AGENT, "status", "--timeout", "2")
    one_line_error(out, exit_codes.TIMEOUT, "stays queued", "edge-coordinator result ")
    task_id = re.search(r"edge-coordinator result ([0-9a-f-]{36})", out.stderr).group(1)
    one_line_error(cli("result", "--data-dir", data, task_id), exit_codes.TIMEOUT, "no result from 'pi-01'")
    agent.start()
    try:
        out = cli("result", task_id[:13], "--data-dir", data, "--timeout", "120", "--json")
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert (reply["task_id"], reply["agent"], reply["status"]) == (task_id, AGENT, "SUCCESS")
        assert reply["result"]["agent_id"] == AGENT
    finally:
        agent.stop()
    one_line_error(cli("result", "--data-dir", data, "0000"), exit_codes.USAGE, "no command with task id")
