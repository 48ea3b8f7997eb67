"""Agents as witnesses end to end: real `edge-coordinator run` (managed Mosquitto with TLS,
anvil, journal) and real `edge-agent run` processes.

(a) agents cosign the checkpoints their receipts carry; the journal keeps the
    cosignatures and `edge-audit verify --witnesses 2` (and a bundle, offline) counts them;
(b) an operator who rewrites the journal and re-signs the log with the same key is
    caught by the agent: receipt refused, evidence kept, alarm in its log, status,
    heartbeat and the coordinator's metrics, readings kept;
(c) split view: two coordinators with the same log key and diverging journals, each
    serving one agent: neither log reaches a quorum of two witnesses, and an auditor
    who has seen both gets pin_inconsistent.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from tests.agent.support import Proc, kill_group
from tests.support.prom import sample

from .support import CoordinatorProcess, audit, wait_until
from .test_tlog_e2e import _rebuild_and_resign, _wipe_chain

pytestmark = pytest.mark.slow

PY = sys.executable


def run_agent(home: Path, log: str, interval: str = "0.2", **env: str) -> Proc:
    base = {"EDGE_AGENT_BACKOFF_MIN": "0.1", "EDGE_AGENT_BACKOFF_MAX": "1", "EDGE_AGENT_PUBLISH_TIMEOUT": "5",
            "EDGE_AGENT_HEARTBEAT_INTERVAL": "0", "EDGE_AGENT_RESEND_AFTER": "5"}
    proc = Proc([PY, "-m", "agent", "--data-dir", str(home), "run", "--interval", interval],
                home.parent / log, env={**base, **env}).start()
    proc.wait_for_output("ready in", timeout=90)
    return proc


def enroll(bundle: Path, home: Path, *extra: str) -> Path:
    assert agent_main(["--data-dir", str(home), "enroll", "--bundle", str(bundle), *extra]) == 0
    return home


def agent_db(home: Path, sql: str, params: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(f"file:{home / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def agent_status(home: Path) -> dict:
    out = subprocess.run([PY, "-m", "agent", "--data-dir", str(home), "status", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def cosigned(coordinator: CoordinatorProcess) -> dict[str, int]:
    return dict(coordinator.query("SELECT agent_id, MAX(size) FROM tlog_cosignature GROUP BY agent_id"))


def verify(data_dir: Path, *extra: str) -> tuple[int, dict]:
    proc = audit(data_dir, "--json", "verify", "--quiet", *extra)
    return proc.returncode, json.loads(proc.stdout)


def test_agents_cosign_and_the_audit_counts_two_witnesses(coordinator: CoordinatorProcess, tmp_path: Path,
                                                          procs: list[Proc]) -> None:
    coordinator.init("wa-1", "wa-2").start()
    homes = [enroll(coordinator.bundle(n), tmp_path / n) for n in ("wa-1", "wa-2")]
    assert all((h / "log.pub").read_text() == (coordinator.data_dir / "pki" / "log.pub").read_text() for h in homes)
    code, report = verify(coordinator.data_dir, "--no-pins", "--witnesses", "2")
    assert code == 1 and "witness_quorum_not_met" in {f["kind"] for f in report["findings"]}  # nobody cosigned yet
    procs.extend(run_agent(h, f"{h.name}.log") for h in homes)
    # each agent must have cosigned twice (first on trust, then after a consistency proof)
    wait_until(lambda: len(coordinator.query("SELECT 1 FROM tlog_cosignature")) >= 4 and len(cosigned(coordinator)) == 2,
               180, "both agents cosigning checkpoints")
    for proc in procs:
        kill_group(proc.proc)
    procs.clear()
    reached = cosigned(coordinator)

    code, report = verify(coordinator.data_dir, "--no-pins", "--witnesses", "2")
    assert code == 0 and report["ok"], report["findings"][:5]
    assert report["witnessed"]["reached"] == {"wa-1": reached["wa-1"], "wa-2": reached["wa-2"]}
    assert report["witnessed"]["size"] == min(reached.values())
    # every stored cosignature verifies and is one of those two agents' keys, bound by its signed cosign task
    rows = coordinator.query("SELECT c.agent_id, e.task_name, e.status, e.agent_id FROM tlog_cosignature c "
                             "JOIN executions e ON e.task_id = c.task_id")
    assert rows and all(a == agent and name == "edge.witness.cosign" and status == "SUCCESS"
                        for a, name, status, agent in rows)
    for home in homes:
        st = agent_status(home)["witness"]
        assert st["alarms"] == 0 and st["accepted_size"] >= reached[home.name]
    bundle = tmp_path / "bundle.json"
    assert audit(coordinator.data_dir, "export", "--bundle", "-o", str(bundle)).returncode == 0
    offline = audit(Path("/nonexistent"), "--json", "verify", "--bundle", str(bundle), "--witnesses", "2",
                    "--log-key", str(coordinator.data_dir / "pki" / "log.pub"), "--no-pins")
    offline_report = json.loads(offline.stdout)
    assert offline.returncode == 0 and offline_report["witnessed"]["reached"] == report["witnessed"]["reached"], \
        offline_report["findings"][:5]
    data = json.loads(bundle.read_text())
    data["witnesses"] = [dict(w, agent_id="wa-2" if w["agent_id"] == "wa-1" else "wa-1") for w in data["witnesses"]]
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(data))  # keys claimed for the other agent: the signed binding refuses both
    offline = audit(Path("/nonexistent"), "--json", "verify", "--bundle", str(swapped), "--witnesses", "2",
                    "--log-key", str(coordinator.data_dir / "pki" / "log.pub"), "--no-pins")
    kinds = [f["kind"] for f in json.loads(offline.stdout)["findings"]]
    assert offline.returncode == 1 and kinds.count("witness_key_unbound") >= 2 and "witness_quorum_not_met" in kinds
    assert (sample(coordinator.metrics(), "edgeledger_tasks_executed_total", task="edge.witness.cosign") or 0) >= 4


def test_a_rewritten_history_is_refused_by_the_agent(coordinator: CoordinatorProcess, tmp_path: Path,
                                                     procs: list[Proc]) -> None:
    coordinator.init("wb-1").start()
    home = enroll(coordinator.bundle("wb-1"), tmp_path / "wb-1")
    procs.append(run_agent(home, "wb-1.log", EDGE_AGENT_HEARTBEAT_INTERVAL="1"))
    wait_until(lambda: len(coordinator.query("SELECT 1 FROM tlog_cosignature")) >= 2, 180, "the agent cosigning")
    wait_until(lambda: sample(coordinator.metrics(), "edgeledger_witness_alarms_total", agent="wb-1") == 0, 60,
               "the agent's heartbeat reporting no alarm")
    assert coordinator.stop(signal.SIGTERM) == 0  # the broker goes with it; the agent keeps sampling offline
    accepted = agent_status(home)["witness"]["accepted_size"]
    assert accepted and accepted >= cosigned(coordinator)["wb-1"]
    # the operator edits one of the agent's readings and re-signs the whole log with the log key
    with sqlite3.connect(coordinator.data_dir / "journal.db") as conn:
        conn.execute("UPDATE executions SET result_digest = ? WHERE log_index = 0", ("0" * 64,))
    _rebuild_and_resign(coordinator.data_dir)
    _wipe_chain(coordinator.data_dir)
    first_kept = int(agent_db(home, "SELECT value FROM meta WHERE key = 'next_seq'")[0][0])
    coordinator.start()

    wait_until(lambda: agent_status(home)["witness"]["alarms"] >= 1, 180, "the agent refusing the rewritten log")
    st = agent_status(home)
    alarm = st["witness"]["last_alarm"]
    assert alarm["kind"] in ("checkpoint_inconsistent", "checkpoint_fork"), alarm
    assert st["witness"]["accepted_size"] == accepted  # it keeps the honest checkpoint
    log = (home.parent / "wb-1.log").read_text()
    assert "WITNESS ALARM" in log and "What to do" in log
    evidence = list((home / "witness-evidence").glob("*.json"))
    assert evidence and json.loads(evidence[0].read_text())["accepted"]
    (old, new) = agent_db(home, "SELECT accepted, presented FROM witness_alarm ORDER BY id LIMIT 1")[0]
    assert old and new and old != new
    human = subprocess.run([PY, "-m", "agent", "--data-dir", str(home), "status"], capture_output=True, text=True,
                           timeout=60).stdout
    assert "WITNESS ALARM" in human and alarm["kind"] in human, human
    wait_until(lambda: (sample(coordinator.metrics(), "edgeledger_witness_alarms_total", agent="wb-1") or 0) >= 1, 60,
               "the heartbeat's alarm flag in the coordinator's metrics")
    # nothing sampled since the rewrite left the outbox (all are journaled, none proven in a log it accepts)
    last = int(agent_db(home, "SELECT value FROM meta WHERE key = 'next_seq'")[0][0]) - 1
    kept = {r[0] for r in agent_db(home, "SELECT seq FROM outbox WHERE task_name = 'edge.ingest'")}
    assert last >= first_kept and set(range(first_kept, last + 1)) <= kept
    journaled = {r[0] for r in coordinator.query("SELECT seq FROM readings WHERE agent_id = 'wb-1' AND seq >= ?",
                                                 (first_kept,))}
    assert journaled, "re-sent readings reach the coordinator (receipts come, and are refused)"


def _fork(source: CoordinatorProcess, target: CoordinatorProcess) -> None:
    """The operator runs a second coordinator from a copy of the first one's data dir: same
    CA, identity and log key (same origin), its own ports; the two journals then diverge."""
    shutil.copytree(source.data_dir, target.data_dir)
    toml = target.data_dir / "coordinator.toml"
    text = toml.read_text().replace(f'"{source.data_dir}"', f'"{target.data_dir}"')
    for old, new in ((source.broker_port, target.broker_port), (source.chain_port, target.chain_port),
                     (source.http_port, target.http_port)):
        text = re.sub(rf"^port = {old}$", f"port = {new}", text, flags=re.M)
    toml.write_text(text)


def test_split_view_lacks_the_quorum_and_an_auditor_who_saw_both_is_told(
        coordinator: CoordinatorProcess, tmp_path: Path, procs: list[Proc]) -> None:
    coordinator.init("wc-1", "wc-2")
    other = CoordinatorProcess(tmp_path / "fork")
    try:
        _fork(coordinator, other)
        coordinator.start()
        other.start()
        one = enroll(coordinator.bundle("wc-1"), tmp_path / "wc-1")
        two = enroll(other.bundle("wc-2"), tmp_path / "wc-2", "--broker-url", f"mqtts://127.0.0.1:{other.broker_port}")
        procs.append(run_agent(one, "wc-1.log"))
        procs.append(run_agent(two, "wc-2.log"))
        wait_until(lambda: list(cosigned(coordinator)) == ["wc-1"] and list(cosigned(other)) == ["wc-2"], 180,
                   "each agent cosigning the log it is shown")
        for proc in procs:
            kill_group(proc.proc)
        procs.clear()
        # each view alone verifies, but neither has two witnesses
        for view in (coordinator, other):
            code, report = verify(view.data_dir, "--no-pins")
            assert code == 0 and report["ok"], report["findings"][:5]
            code, report = verify(view.data_dir, "--no-pins", "--witnesses", "2")
            assert code == 1 and {f["kind"] for f in report["findings"]} == {"witness_quorum_not_met"}, report
            assert len(report["witnessed"]["reached"]) == 1
        # an auditor who has seen both views (one pin file): the second does not extend the first
        pins = tmp_path / "auditor-pins.json"
        code, first = verify(coordinator.data_dir, "--pins", str(pins))
        assert code == 0 and first["ok"]
        code, second = verify(other.data_dir, "--pins", str(pins))
        assert code == 1 and "pin_inconsistent" in {f["kind"] for f in second["findings"]}, second["findings"][:5]
        assert first["origin"] == second["origin"]
    finally:
        other.cleanup()
