"""Agent SIGKILL in the exact window between accepting a receipt and deleting the rows it
confirms: nothing is lost and nothing reaches the journal or the chain twice (issue #11).

How the window is hit without a hook in the product: the test holds the write lock of
the agent's outbox (BEGIN IMMEDIATE on the same SQLite file), so `Outbox.confirm`
blocks on its own BEGIN IMMEDIATE right after `apply_receipt` verified the receipt and
logged "receipt accepted"; the test SIGKILLs the agent there, shows the confirmed rows
are still in the outbox, releases the lock and restarts the agent, which re-sends them.

Real processes: `edge-coordinator run` (Mosquitto with mutual TLS, anvil), `edge-agent run`.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.agent.support import Proc, kill_group
from tests.support.prom import sample

from .support import CoordinatorProcess, verified_anchored, wait_until
from .test_receipts_e2e import drain_and_check, enroll, run_agent, seqs, some_confirmed

pytestmark = pytest.mark.slow

RESEND_AFTER = 3.0  # EDGE_AGENT_RESEND_AFTER in run_agent
ACCEPTED = re.compile(r"receipt accepted: upto (\d+), (\d+) ranges above")


def hold_outbox_lock(path: Path) -> sqlite3.Connection:
    """BEGIN IMMEDIATE on the outbox once it holds published, unconfirmed readings (so a
    receipt for them is on its way: they are in the broker, or journaled and noted)."""
    def locked() -> sqlite3.Connection | None:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL").fetchone()[0] > 0:
            return conn
        conn.execute("ROLLBACK")
        conn.close()
        return None
    return wait_until(locked, 60, "published readings awaiting a receipt", interval=0.1)


def last_receipt_at(home: Path) -> float | None:
    db = sqlite3.connect(f"file:{home / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'last_receipt_at'").fetchone()
        return float(row[0]) if row else None
    finally:
        db.close()


def duplicates(coordinator: CoordinatorProcess) -> float:
    return sample(coordinator.metrics(), "edgeledger_tasks_duplicate_total", task="edge.ingest") or 0


def test_agent_killed_between_receipt_and_delete_duplicates_nothing(
        coordinator: CoordinatorProcess, tmp_path: Path, procs: list[Proc]) -> None:
    coordinator.init("rk-a").start()
    home = enroll(coordinator, "rk-a", tmp_path / "rk-a")
    procs.append(run_agent(home, "0.1", "run1.log", EDGE_AGENT_LOG_LEVEL="INFO"))
    log = home.parent / "run1.log"
    wait_until(lambda: len(seqs(coordinator, "rk-a")) >= 20, 120, "streaming")
    wait_until(lambda: some_confirmed(home) and last_receipt_at(home) is not None, 60,
               "a first receipt deleted confirmed readings")

    lock = hold_outbox_lock(home / "outbox.sqlite3")
    try:
        # the agent verified a receipt and is blocked in its delete (accepted, not yet applied)
        wait_until(lambda: log.read_text().count("receipt accepted") > log.read_text().count("receipt verified"),
                   60, "a receipt accepted whose delete waits for the outbox lock")
        upto = int(ACCEPTED.findall(log.read_text())[-1][0])
        kill_group(procs.pop().proc, signal.SIGKILL)
        # the kill came after verification and before the delete: confirmed rows are still there
        held = lock.execute("SELECT COUNT(*) FROM outbox WHERE task_name = 'edge.ingest' AND seq <= ?",
                            (upto,)).fetchone()[0]
        at_kill = lock.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        resend_due = lock.execute("SELECT MAX(sent_at) FROM outbox").fetchone()[0]
        last_receipt = float(lock.execute("SELECT value FROM meta WHERE key = 'last_receipt_at'").fetchone()[0])
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert held > 0, f"no row with seq <= {upto} left: the kill missed the window"
    assert "receipt verified" not in log.read_text().split("receipt accepted")[-1]  # the delete never ran
    journaled_then = set(seqs(coordinator, "rk-a"))
    assert set(range(1, upto + 1)) <= journaled_then  # the receipt told the truth

    # every row still held is due for a re-send when the agent restarts (deterministic re-send)
    due = max(float(resend_due), last_receipt) + RESEND_AFTER
    wait_until(lambda: time.time() > due, RESEND_AFTER + 5, "the held rows due for a re-send")
    before = duplicates(coordinator)
    last = drain_and_check(coordinator, home, "rk-a", procs)  # seqs 1..last exactly once, outbox empty

    # the re-sent, already journaled readings were deduplicated quietly (counted, not refused);
    # at least once each: a re-send not confirmed within RESEND_AFTER is sent again (receipts
    # come at most every receipt_interval), so the count may exceed the rows held
    resent_dups = duplicates(coordinator) - before
    assert resent_dups >= held, (held, resent_dups, at_kill)
    quarantine = coordinator.data_dir / "quarantine.sqlite"
    if quarantine.exists():
        db = sqlite3.connect(f"file:{quarantine}?mode=ro", uri=True)
        try:
            assert db.execute("SELECT reason, COUNT(*) FROM quarantine GROUP BY 1").fetchall() == []
        finally:
            db.close()

    # on chain exactly once: one chain row per journal row, every reading anchored
    wait_until(coordinator.all_confirmed, 120, "every journal row anchored")
    report = verified_anchored(coordinator.data_dir)
    rows = coordinator.query("SELECT COUNT(*) FROM executions")[0][0]
    assert report["rows"] == rows
    assert coordinator.query("SELECT COUNT(*) FROM executions WHERE task_name = 'edge.ingest' AND "
                             "anchor_state = 'confirmed' AND agent_id = 'rk-a'") == [(last,)]
    (agent,) = [c for c in report["completeness"] if c["agent_id"] == "rk-a"]
    assert agent["stored"] == last and agent["missing"] == 0
    print(f"kill window: receipt upto {upto}, {held} confirmed rows held at the kill ({at_kill} in the outbox), "
          f"{resent_dups:g} re-sends deduplicated, {last} readings journaled and anchored once")
