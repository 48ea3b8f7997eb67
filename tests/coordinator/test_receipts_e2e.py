"""Every reading accounted for, end to end: real `edge-coordinator run` (managed Mosquitto,
anvil, journal) and a real `edge-agent run`. Each test ends with exact counts: the journal
holds seqs 1..N exactly once (N = what the agent stored), the agent's outbox is empty
(everything confirmed by a signed receipt), nothing was refused as a replay.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from tests.agent.support import Proc, kill_group
from tests.support.files import immutable
from tests.support.prom import sample

from .support import CoordinatorProcess, audit, cli, verified_anchored, wait_until

pytestmark = pytest.mark.slow


def run_agent(home: Path, interval: str, log: str, **env: str) -> Proc:
    base = {"EDGE_AGENT_BACKOFF_MIN": "0.1", "EDGE_AGENT_BACKOFF_MAX": "1", "EDGE_AGENT_PUBLISH_TIMEOUT": "5",
            "EDGE_AGENT_HEARTBEAT_INTERVAL": "0", "EDGE_AGENT_RESEND_AFTER": "3"}
    proc = Proc([sys.executable, "-m", "agent", "--data-dir", str(home), "run", "--interval", interval],
                home.parent / log, env={**base, **env}).start()
    proc.wait_for_output("ready in", timeout=90)
    return proc


def outbox(home: Path) -> tuple[int, int]:
    """(rows still in the outbox, last seq stored), read from one snapshot: two separate
    reads race the agent, which may store readings between them."""
    db = sqlite3.connect(f"file:{home / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN")
        rows = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        nxt = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        db.execute("COMMIT")
        return rows, int(nxt[0]) - 1 if nxt else 0
    finally:
        db.close()


def some_confirmed(home: Path) -> bool:
    """A receipt deleted confirmed readings: fewer rows left than readings stored (one
    snapshot: `outbox(home)[0] < outbox(home)[1]` would read twice and race the agent)."""
    rows, last = outbox(home)
    return rows < last


def seqs(coordinator: CoordinatorProcess, agent: str) -> list[int]:
    return [r[0] for r in coordinator.query("SELECT seq FROM readings WHERE agent_id = ? ORDER BY seq", (agent,))]


def drain_and_check(coordinator: CoordinatorProcess, home: Path, agent: str, procs: list[Proc]) -> int:
    """Restart the agent idle (it samples once), wait until every reading is confirmed
    and assert the exact outcome; returns N."""
    procs.append(run_agent(home, "3600", "drain.log"))
    wait_until(lambda: outbox(home)[0] == 0, 180, "every reading confirmed by a receipt (outbox empty)")
    last = outbox(home)[1]
    assert seqs(coordinator, agent) == list(range(1, last + 1))  # no loss, no duplicate
    assert coordinator.query("SELECT COUNT(*) FROM executions WHERE task_name = 'edge.ingest' AND agent_id = ?",
                             (agent,)) == [(last,)]
    assert only_byte_identical_replays_refused(coordinator.data_dir)
    # receipts are pushes like update_crl: the agent answers none of them with a command result
    assert coordinator.query("SELECT COUNT(*) FROM executions WHERE task_name = 'edge.command_result'") == [(0,)]
    return last


def only_byte_identical_replays_refused(data_dir: Path) -> bool:
    """Re-sends (new envelopes under an accepted id) pass; what the replay guard refused
    must be exact copies of envelopes it had accepted (a broker redelivering, after its
    crash, what the coordinator already acked), never anything else."""
    if not (data_dir / "quarantine.sqlite").exists():
        return True
    quarantine = sqlite3.connect(f"file:{data_dir / 'quarantine.sqlite'}?mode=ro", uri=True)
    replay = sqlite3.connect(f"file:{data_dir / 'replay.sqlite'}?mode=ro", uri=True)
    try:
        accepted = {r[0] for r in replay.execute("SELECT envelope_digest FROM seen UNION SELECT envelope_digest FROM resent")}
        for reason, body in quarantine.execute("SELECT reason, body FROM quarantine"):
            raw = body if isinstance(body, bytes) else body.encode()
            assert reason == "replay" and hashlib.sha256(raw).hexdigest() in accepted, (reason, raw[:200])
    finally:
        quarantine.close()
        replay.close()
    return True


def enroll(coordinator: CoordinatorProcess, name: str, home: Path) -> Path:
    assert agent_main(["--data-dir", str(home), "enroll", "--bundle", str(coordinator.bundle(name))]) == 0
    return home


def test_broker_and_agent_sigkill_lose_and_duplicate_nothing(coordinator: CoordinatorProcess, tmp_path: Path,
                                                             procs: list[Proc]) -> None:
    coordinator.init("rc-a").start()
    home = enroll(coordinator, "rc-a", tmp_path / "rc-a")
    procs.append(run_agent(home, "0.1", "run1.log"))
    wait_until(lambda: len(seqs(coordinator, "rc-a")) >= 20, 120, "streaming")
    wait_until(lambda: some_confirmed(home), 60, "a first receipt deleted confirmed readings")

    # 1. the broker dies mid-stream (it persists every broker.autosave_interval); the daemon restarts it
    first = coordinator.mosquitto_pid()
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: coordinator.mosquitto_pid() not in (None, first) and coordinator.healthy(), 120,
               "mosquitto restarted")
    journaled = len(seqs(coordinator, "rc-a"))
    wait_until(lambda: len(seqs(coordinator, "rc-a")) >= journaled + 20, 120, "streaming after the broker restart")

    # 2. the agent dies while receipts for journaled readings are on their way (or queued)
    kill_group(procs.pop().proc, signal.SIGKILL)
    assert outbox(home)[0] > 0, "the kill must leave unconfirmed readings behind"

    last = drain_and_check(coordinator, home, "rc-a", procs)
    assert last > journaled + 20
    wait_until(coordinator.all_confirmed, 120, "every journal row anchored")
    report = verified_anchored(coordinator.data_dir)
    rows = coordinator.query("SELECT COUNT(*) FROM executions")[0][0]
    assert report["rows"] == rows  # one chain row per journal row: a re-send never reached the chain twice


def test_unwritable_journal_for_20s_loses_nothing_and_recovers_by_itself(
        coordinator: CoordinatorProcess, tmp_path: Path, procs: list[Proc]) -> None:
    coordinator.init("rj-a").start()
    home = enroll(coordinator, "rj-a", tmp_path / "rj-a")
    procs.append(run_agent(home, "0.1", "run1.log"))
    wait_until(lambda: len(seqs(coordinator, "rj-a")) >= 10, 120, "streaming")
    with immutable(Path(f"{coordinator.data_dir / 'journal.db'}-wal")) as applied:
        if not applied:
            pytest.skip("chattr +i is not available here: cannot make the journal unwritable for root")
        wait_until(lambda: (sample(coordinator.metrics(), "edgeledger_journal_write_failures_total",
                                   task="edge.ingest") or 0) >= 1, 60, "a refused journal write counted")
        time.sleep(20)  # the fault's duration, not a wait for a result
        held = len(seqs(coordinator, "rj-a"))
    assert "cannot be written" in coordinator.log() and "chattr -i" in coordinator.log()
    wait_until(lambda: len(seqs(coordinator, "rj-a")) > held + 10, 120, "ingestion resumed by itself")
    kill_group(procs.pop().proc)
    drain_and_check(coordinator, home, "rj-a", procs)


def test_outbox_overflow_is_counted_and_visible_in_audit_and_agents(
        coordinator: CoordinatorProcess, tmp_path: Path, procs: list[Proc]) -> None:
    coordinator.init("ro-a").start()
    home = enroll(coordinator, "ro-a", tmp_path / "ro-a")
    procs.append(run_agent(home, "0.05", "run1.log", EDGE_AGENT_OUTBOX_MAX="30", EDGE_AGENT_HEARTBEAT_INTERVAL="1"))
    wait_until(lambda: len(seqs(coordinator, "ro-a")) >= 10, 120, "streaming")
    assert coordinator.stop() == 0  # the broker goes with it: the agent is offline
    wait_until(lambda: agent_meta(home, "dropped") >= 20, 60, "the bounded outbox dropping the oldest readings")
    assert (home.parent / "run1.log").read_text().count("dropping the oldest") == 1  # once per episode
    coordinator.start()
    kill_group(procs.pop().proc)
    procs.append(run_agent(home, "3600", "drain.log", EDGE_AGENT_HEARTBEAT_INTERVAL="1"))
    wait_until(lambda: outbox(home)[0] == 0, 180, "every kept reading confirmed")
    dropped, last = agent_meta(home, "dropped"), outbox(home)[1]

    def listed() -> dict:
        out = cli("agents", "--data-dir", str(coordinator.data_dir), "--json")
        return {a["agent_id"]: a for a in json.loads(out.stdout)}["ro-a"]

    wait_until(lambda: listed()["dropped"] == dropped and listed()["unconfirmed"] == 0, 60,
               "the heartbeat's dropped/unconfirmed counts in `agents`")
    row = listed()
    stored = len(seqs(coordinator, "ro-a"))
    # every seq is stored or missing; a missing one is one the agent dropped (it may also have
    # dropped a few the coordinator had already journaled, before their receipt came)
    assert stored + row["gaps"] == last and 0 < row["gaps"] <= dropped
    table = cli("agents", "--data-dir", str(coordinator.data_dir)).stdout
    assert "GAPS" in table and "DROPPED" in table

    verified = audit(coordinator.data_dir, "--json", "verify", "--no-signatures", "--quiet")
    assert verified.returncode == 1, verified.stdout + verified.stderr  # gaps fail the audit
    report = json.loads(verified.stdout)
    (agent,) = [c for c in report["completeness"] if c["agent_id"] == "ro-a"]
    assert agent["missing"] == row["gaps"] and agent["dropped"] == dropped and agent["stored"] == stored
    kinds = [f["kind"] for f in report["findings"]]
    assert "seq_gap" in kinds and "readings_dropped" in kinds


def agent_meta(home: Path, key: str) -> int:
    db = sqlite3.connect(f"file:{home / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0
    finally:
        db.close()
