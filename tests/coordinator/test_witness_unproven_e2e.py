"""Agents as witnesses end to end: a reading the coordinator confirms but never proves.

A real `edge-coordinator run` whose journal loses one reading's salt right after
journaling it (a trigger stands in for a coordinator that says "stored" but cannot, or
will not, prove it): every receipt confirms that reading, none carries its inclusion
proof. The real `edge-agent run` raises one `reading_unproven` alarm (log, status,
heartbeat, coordinator metric), keeps the reading, and keeps deleting the others.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from security.contract import reading_task_id
from tests.agent.support import Proc
from tests.support.prom import sample

from .support import CoordinatorProcess, wait_until
from .test_witness_e2e import agent_db, agent_status, enroll, run_agent

pytestmark = pytest.mark.slow

PY = sys.executable
AGENT = "wu-1"
LOST = 5  # the reading whose proof the coordinator can never give


def test_a_reading_confirmed_but_never_proven_raises_one_alarm_and_stays(
        coordinator: CoordinatorProcess, tmp_path: Path, procs: list[Proc]) -> None:
    coordinator.init(AGENT).start()
    wait_until(lambda: coordinator.query("SELECT name FROM sqlite_master WHERE name = 'record_salt'"), 60,
               "the journal's schema")
    with sqlite3.connect(coordinator.data_dir / "journal.db", timeout=60) as conn:
        conn.execute(f"CREATE TRIGGER lose_salt AFTER INSERT ON record_salt WHEN NEW.task_id = "
                     f"'{reading_task_id(AGENT, LOST)}' BEGIN DELETE FROM record_salt WHERE task_id = NEW.task_id; END")
    home = enroll(coordinator.bundle(AGENT), tmp_path / AGENT)
    # the bound used is max(timeout, 2 x resend_after) = 10 s here
    procs.append(run_agent(home, f"{AGENT}.log", EDGE_AGENT_HEARTBEAT_INTERVAL="1",
                           EDGE_AGENT_WITNESS_PROOF_TIMEOUT="1"))

    wait_until(lambda: agent_status(home)["witness"]["alarms"] >= 1, 240, "the agent's reading_unproven alarm")
    st = agent_status(home)["witness"]
    assert st["last_alarm"]["kind"] == "reading_unproven" and f"seq {LOST}" in st["last_alarm"]["detail"], st
    ((evidence,),) = agent_db(home, "SELECT evidence FROM witness_alarm WHERE kind = 'reading_unproven'")
    (reading,) = json.loads(evidence)["readings"]
    assert reading["seq"] == LOST and reading["misses"] >= 3
    assert all(r["size"] > reading["first_checkpoint_size"] for r in reading["receipts_since"])
    assert coordinator.query("SELECT seq FROM readings WHERE agent_id = ? AND seq = ?", (AGENT, LOST))  # journaled
    log = (home.parent / f"{AGENT}.log").read_text()
    assert "WITNESS ALARM reading_unproven" in log and "never deleted without a proof" in log
    human = subprocess.run([PY, "-m", "agent", "--data-dir", str(home), "status"], capture_output=True, text=True,
                           timeout=60).stdout
    assert "WITNESS ALARM: reading_unproven" in human, human
    wait_until(lambda: (sample(coordinator.metrics(), "edgeledger_witness_alarms_total", agent=AGENT) or 0) >= 1, 60,
               "the heartbeat's alarm count in the coordinator's metrics")

    # more receipts come and go: the reading stays, the others keep leaving, no second alarm
    misses = reading["misses"]
    wait_until(lambda: agent_db(home, "SELECT misses FROM witness_unproven WHERE seq = ?", (LOST,))[0][0] >= misses + 3,
               180, "three more receipts that do not prove it")
    assert len(agent_db(home, "SELECT 1 FROM witness_alarm")) == 1
    kept = {r[0] for r in agent_db(home, "SELECT seq FROM outbox WHERE task_name = 'edge.ingest' AND seq <= ?",
                                   (LOST + 20,))}
    assert kept == {LOST}, kept  # its neighbours were proven and deleted; it never is
