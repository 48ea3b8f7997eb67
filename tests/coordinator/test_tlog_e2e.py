"""The transparency log end to end with a real `edge-coordinator run` (real Mosquitto, anvil).

Issue #12: the log key is made by `init`; the daemon serves checkpoints and proofs that
verify under `pki/log.pub` alone; `erase` removes raw data while audits keep verifying;
and an operator who edits the journal, wipes the chain and lets the coordinator
re-anchor is caught, as is one who also rebuilds and re-signs the whole log (the pin).
"""

from __future__ import annotations

import base64
import json
import re
import signal
import sqlite3
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ledger.record import ExecutionRecord
from ledger.tlog.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from ledger.tlog.merkle import MerkleLog, SQLiteNodeStore, leaf_hash, verify_consistency
from ledger.tlog.note import Ed25519Signer, Ed25519Verifier
from ledger.tlog.proof import verify_proof_bundle

from .support import CoordinatorProcess, audit, cli, simagent, wait_until

pytestmark = pytest.mark.slow


def _get(coordinator: CoordinatorProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{coordinator.http_port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _verify(coordinator: CoordinatorProcess, *extra: str) -> tuple[int, dict]:
    proc = audit(coordinator.data_dir, "--json", "verify", "--quiet", *extra)
    return proc.returncode, json.loads(proc.stdout)


def _kinds(report: dict) -> set[tuple[str | None, str]]:
    return {(f["task_id"], f["kind"]) for f in report["findings"]}


def _all_checkpoints_anchored(coordinator: CoordinatorProcess) -> bool:
    states = dict(coordinator.query("SELECT anchor_state, COUNT(*) FROM tlog_checkpoint GROUP BY 1"))
    return bool(states) and set(states) == {"confirmed"}


def _wipe_chain(data_dir: Path) -> None:
    for f in (data_dir / "chain").rglob("*.json"):
        f.unlink()


def test_log_served_erased_and_rewrites_caught(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    coordinator.init("tl-a")
    pki = coordinator.data_dir / "pki"
    assert stat.S_IMODE((pki / "log.key").stat().st_mode) == 0o600
    log_verifier = Ed25519Verifier.from_vkey((pki / "log.pub").read_text().strip())
    assert log_verifier.name.startswith("edgeledger/") and log_verifier.name.endswith("/coordinator")
    assert (coordinator.bundle("tl-a") / "log.pub").read_text() == (pki / "log.pub").read_text()  # agents get it

    coordinator.start()
    pub = simagent(coordinator.bundle("tl-a"), "--count", "40")
    out, err = pub.communicate(timeout=120)
    assert pub.returncode == 0, err[-2000:]
    wait_until(lambda: coordinator.readings() == 40, 90, "40 readings stored")
    wait_until(coordinator.all_confirmed, 90, "every row covered by an anchored checkpoint")

    # -- served: checkpoint, inclusion proof by task id, consistency between two checkpoints
    code, note = _get(coordinator, "/tlog/checkpoint")
    cp, _ = open_checkpoint(note, log_verifier)
    assert code == 200 and cp.size >= 40
    task_id = coordinator.query("SELECT task_id FROM executions WHERE task_name = 'edge.ingest' ORDER BY id LIMIT 1")[0][0]
    journal_row = _row(coordinator, task_id)
    code, proof = _get(coordinator, f"/tlog/proof?task_id={task_id}")
    leaf = leaf_hash(ExecutionRecord.from_mapping(journal_row).canonical_json())
    assert code == 200 and verify_proof_bundle(proof, leaf, log_verifier).checkpoint.size == cp.size, proof
    sizes = [r[0] for r in coordinator.query("SELECT size FROM tlog_checkpoint ORDER BY size")]
    if len(sizes) >= 2:
        code, text = _get(coordinator, f"/tlog/consistency?from={sizes[0]}&to={sizes[-1]}")
        roots = dict(coordinator.query("SELECT size, root FROM tlog_checkpoint"))
        verify_consistency(sizes[0], sizes[-1], bytes.fromhex(roots[sizes[0]]), bytes.fromhex(roots[sizes[-1]]),
                           [base64.b64decode(line) for line in text.splitlines()])
    assert _get(coordinator, "/tlog/proof?index=999999")[0] == 404
    code, page = _get(coordinator, "/fleet")  # the fleet page shows the log's newest signed and anchored checkpoints
    shown = re.search(r"<th>anchored tree size</th><td>(\d+)</td>", page)
    anchored = {r[0] for r in coordinator.query("SELECT size FROM tlog_checkpoint WHERE anchor_state = 'confirmed'")}
    assert code == 200 and "signed tree size" in page and shown and int(shown.group(1)) in anchored, page[-3000:]

    code, report = _verify(coordinator, "--require-anchored")
    assert code == 0 and report["ok"] and report["on_chain"] == report["rows"], report["findings"][:5]
    assert (coordinator.data_dir / "audit-pins.json").exists()  # first use pinned the log

    # -- a self-contained bundle verifies offline (no journal, no chain)
    bundle_path = tmp_path / "bundle.json"
    exported = audit(coordinator.data_dir, "export", "--bundle", "-o", str(bundle_path))
    assert exported.returncode == 0, exported.stderr
    offline = audit(Path("/nonexistent"), "--json", "verify", "--bundle", str(bundle_path), "--log-key",
                    str(pki / "log.pub"), "--pins", str(tmp_path / "offline-pins.json"))
    offline_report = json.loads(offline.stdout)
    assert offline.returncode == 0 and offline_report["on_chain"] == offline_report["rows"] == report["rows"]
    assert offline_report["signatures_ok"] == report["rows"]

    # -- erasure: raw readings, envelopes and salts go; the log and the audit still verify
    salted = coordinator.query("SELECT COUNT(*) FROM record_salt")[0][0]
    assert salted == report["rows"]
    erased = cli("erase", "--data-dir", str(coordinator.data_dir), "--agent", "tl-a", "--before", str(time.time()))
    assert erased.returncode == 0 and "40 readings" in erased.stdout, erased.stdout + erased.stderr
    assert coordinator.readings() == 0
    assert coordinator.query("SELECT COUNT(*) FROM executions WHERE envelope IS NOT NULL AND agent_id = 'tl-a'") == [(0,)]
    assert coordinator.query("SELECT COUNT(*) FROM record_salt") == [(0,)]
    code, report = _verify(coordinator, "--require-anchored")
    assert code == 0 and report["ok"] and report["erased"] == report["rows"], report["findings"][:5]
    shown = json.loads(audit(coordinator.data_dir, "--json", "show", task_id).stdout)
    assert shown["erased"] is True and shown["inclusion_proof"].startswith("c2sp.org/tlog-proof@v1\n")

    # -- the operator edits a record, wipes the chain, and lets the coordinator re-anchor
    assert coordinator.stop(signal.SIGTERM) == 0
    stored = coordinator.query("SELECT size, root, note FROM tlog_checkpoint ORDER BY size")
    with sqlite3.connect(coordinator.data_dir / "journal.db") as conn:
        conn.execute("UPDATE executions SET status = 'FAILURE' WHERE task_id = ?", (task_id,))
        edited = ExecutionRecord.from_mapping(_row(coordinator, task_id, conn))
        conn.execute("UPDATE executions SET digest = ? WHERE task_id = ?", (edited.digest().hex(), task_id))
    _wipe_chain(coordinator.data_dir)
    coordinator.start()
    wait_until(lambda: _all_checkpoints_anchored(coordinator), 90, "stored checkpoints re-anchored on the new chain")
    assert coordinator.query("SELECT size, root, note FROM tlog_checkpoint ORDER BY size")[:len(stored)] == stored
    code, report = _verify(coordinator)
    assert code == 1 and _kinds(report) == {(task_id, "record_not_in_log")}, report["findings"][:5]

    # -- ... or also rebuilds the whole log and re-signs it with the log key, then wipes the chain again
    assert coordinator.stop(signal.SIGTERM) == 0
    _rebuild_and_resign(coordinator.data_dir)
    _wipe_chain(coordinator.data_dir)
    coordinator.start()
    wait_until(lambda: _all_checkpoints_anchored(coordinator), 90, "the rewritten checkpoints anchored")
    code, report = _verify(coordinator)
    assert code == 1 and {k for _, k in _kinds(report)} == {"pin_inconsistent"}, report["findings"][:5]
    # an auditor without a pin sees a clean log: what the pin (and, later, witnesses) are for
    code, fresh = _verify(coordinator, "--no-pins")
    assert code == 0 and fresh["ok"]


def _row(coordinator: CoordinatorProcess, task_id: str, conn: sqlite3.Connection | None = None) -> dict:
    own = conn is None
    conn = conn or sqlite3.connect(coordinator.data_dir / "journal.db")
    try:
        cur = conn.execute("SELECT * FROM executions WHERE task_id = ?", (task_id,))
        return dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=False))
    finally:
        if own:
            conn.close()


def _rebuild_and_resign(data_dir: Path) -> None:
    """A forger holding the database and pki/log.key: a whole new tree, new checkpoints, sizes kept."""
    signer = Ed25519Signer.from_skey((data_dir / "pki" / "log.key").read_text().strip())
    with sqlite3.connect(data_dir / "journal.db") as conn:
        conn.execute("DELETE FROM tlog_node")
        cur = conn.execute("SELECT * FROM executions ORDER BY log_index")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r, strict=False)) for r in cur]
        log = MerkleLog(SQLiteNodeStore(conn, "tlog_node"))
        log.extend(ExecutionRecord.from_mapping(r).canonical_json() for r in rows)
        for (size,) in conn.execute("SELECT size FROM tlog_checkpoint").fetchall():
            new = Checkpoint(signer.name, size, log.root(size))
            conn.execute("UPDATE tlog_checkpoint SET root = ?, note = ?, anchor_state = 'pending' WHERE size = ?",
                         (new.root_hash.hex(), sign_checkpoint(new, signer), size))
