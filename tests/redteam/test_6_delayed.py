"""Delayed tasks: an ETA beyond the freshness window (`max_age_seconds`, default 300 s)
cannot be honoured (the message would be `stale` by then), so the operator is told at
send time; an ETA within it waits in an offline agent's session and runs after the
agent restarts. An agent may not park tasks at the coordinator for long either."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.coordinator.support import ROOT

from .attacker import INGEST_TOPIC, eta_in
from .fleet import VICTIM, Fleet, settle

pytestmark = pytest.mark.slow

VQ = f"agent.{VICTIM}"
B_TOPICS = (f"kombu/d/{VQ}/{VQ}", f"kombu/d/amq.default/{VQ}")


def test_countdown_beyond_the_freshness_window_is_refused_at_send_time(fleet: Fleet) -> None:
    observer = fleet.observer()
    for topic in B_TOPICS:
        assert observer.subscribe(topic) == [1]
    out = fleet.send(VICTIM, "set_interval", "5.5", "--countdown", "3600", timeout=30)
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert "3600" in out.stderr, out.stderr  # says which delay it refused
    # nothing was published: a later command reaches B first and finds the old interval
    assert fleet.status_of(VICTIM)["interval"] != 5.5
    sent = [json.loads(p)["headers"].get("task") for t, p in observer.received() if t in B_TOPICS]
    assert sent == ["edge.agent.status"], sent


def test_countdown_within_the_window_runs_after_the_agent_restarts(fleet: Fleet) -> None:
    observer = fleet.observer()
    for topic in B_TOPICS:
        assert observer.subscribe(topic) == [1]
    fleet.victim.stop()
    caller = None
    try:
        caller = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "send", "--data-dir", str(fleet.data_dir), VICTIM, "status",
             "--countdown", "3", "--timeout", "150"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        settle(fleet, lambda: [p for t, p in observer.received() if t in B_TOPICS] or caller.poll() is not None, 60,
               "the delayed command queued for the offline agent")
        assert caller.poll() is None, caller.communicate()
        queued = json.loads([p for t, p in observer.received() if t in B_TOPICS][0])
        assert queued["headers"]["task"] == "edge.agent.status" and queued["headers"]["eta"], queued["headers"]
        fleet.victim.start()
        out, err = caller.communicate(timeout=200)
    finally:
        if caller is not None and caller.poll() is None:
            caller.kill()
            caller.communicate()
        if fleet.victim.proc is None:
            fleet.victim.start()
    assert caller.returncode == 0, err
    reply = json.loads(out)
    assert reply["status"] == "SUCCESS" and reply["result"]["agent_id"] == VICTIM
    settle(fleet, lambda: fleet.coordinator.query(
        "SELECT status FROM command_results WHERE command_task_id = ?", (reply["task_id"],)), 60,
        "the delayed command's result journaled")


def test_agent_task_parked_far_in_the_future_is_refused(fleet: Fleet) -> None:
    a = fleet.attacker()
    before = fleet.refusals("eta_too_far")
    msg = a.reading_task(5_000_000, eta=eta_in(86_400))
    tid = msg["headers"]["id"]
    assert a.publish(INGEST_TOPIC, msg) == 0
    settle(fleet, lambda: fleet.quarantined(tid), 30, "the far-future task quarantined")
    assert [r.reason for r in fleet.quarantined(tid)] == ["eta_too_far"]
    assert fleet.executions(tid) == []
    assert fleet.refusals("eta_too_far") == before + 1
