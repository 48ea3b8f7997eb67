"""Two real `edge-agent run` processes with the same identity files against a real coordinator.

Before: they kicked each other off the broker (MQTT client-id takeover) several times
a second, forever, and nobody said why. Now the takeover pattern is recognised:
one ERROR naming the cause and the fix per episode, reconnects paused, `edge-agent
status` shows it, the heartbeat carries it, and the coordinator counts it
(`agents` warns, `edgeledger_agent_takeovers_total`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from tests.agent.support import Proc
from tests.support.prom import sample

from .support import CoordinatorProcess, cli, wait_until
from .test_revocation import agent_cli

pytestmark = pytest.mark.slow

CAUSE = "another device is connected with agent id 'dup-01'"


def start(home: Path) -> Proc:
    env = {"EDGE_AGENT_BACKOFF_MIN": "0.1", "EDGE_AGENT_BACKOFF_MAX": "1", "EDGE_AGENT_PUBLISH_TIMEOUT": "5",
           "EDGE_AGENT_HEARTBEAT_INTERVAL": "1"}
    return Proc([sys.executable, "-m", "agent", "--data-dir", str(home), "run", "--interval", "1"],
                home.parent / f"{home.name}.log", env=env).start()


def error_lines(proc: Proc) -> list[str]:
    return [line for line in proc.output().splitlines() if CAUSE in line]


def test_two_devices_one_id_detected_reported_and_counted(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    coordinator.init("dup-01").start()
    first = tmp_path / "device-a"
    assert agent_main(["--data-dir", str(first), "enroll", "--bundle", str(coordinator.bundle("dup-01"))]) == 0
    second = tmp_path / "device-b"
    shutil.copytree(first, second)  # a cloned device: the same key, certificate and agent id
    a, b = start(first), start(second)
    try:
        a.wait_for_output("ready in", timeout=90)
        b.wait_for_output("ready in", timeout=90)
        wait_until(lambda: error_lines(a) or error_lines(b), 90, "a device reporting the duplicate id")
        reporter, home = (a, first) if error_lines(a) else (b, second)
        line = error_lines(reporter)[0]
        assert "ERROR" in line and "Fix: stop the other device, or give it its own identity" in line

        status = agent_cli(home, "status")
        assert status.returncode == 0, status.stderr
        assert f"DUPLICATE ID: {CAUSE}" in status.stdout and "fix: stop the other device" in status.stdout
        mark = json.loads(agent_cli(home, "status", "--json").stdout)["takeover"]
        assert mark["count"] >= 1 and mark["pause"] >= 5  # reconnects paused, not a storm

        def reported() -> dict | None:
            out = cli("agents", "--json", "--data-dir", str(coordinator.data_dir))
            view = {v["agent_id"]: v for v in json.loads(out.stdout)}["dup-01"]
            return out if view.get("takeovers") else None

        out = wait_until(reported, 90, "the coordinator's registry showing the takeovers (heartbeat)")
        assert f"warning: dup-01: {CAUSE}" in out.stderr
        metrics = wait_until(lambda: (text := coordinator.metrics()) and
                             (sample(text, "edgeledger_agent_takeovers_total", agent="dup-01") or 0) >= 1 and text,
                             30, "edgeledger_agent_takeovers_total for dup-01")
        assert sample(metrics, "edgeledger_agent_takeovers_total", agent="dup-01") >= 1
    finally:
        a.stop()
        b.stop()
    # one ERROR per episode, not one per reconnect
    assert len(error_lines(a)) <= 1 and len(error_lines(b)) <= 1
