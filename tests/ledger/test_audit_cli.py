"""`edge-audit` end to end on a real anvil: verify, tampering, forged events, queries, bundles, pins.

Adapted to checkpoint anchoring (issue #12): records are proven by inclusion in signed,
anchored checkpoints, so tampering shows as `record_not_in_log` / `record_missing`
instead of per-record on-chain digest mismatches.
"""

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from eth_account import Account

from ledger import contract
from ledger.audit_cli import main
from ledger.deploy import connect, deploy_contract, fee_params
from ledger.journal import Journal, certificate_fingerprint
from ledger.writer import ChainWriter

from .helpers import make_log, make_record

REPO = Path(__file__).resolve().parents[2]
RECORDER_KEY, FORGER_KEY = 5, 6
N = 12
STATE_HOME = ""


@pytest.fixture(autouse=True)
def _own_state_home(tmp_path, monkeypatch):
    global STATE_HOME
    STATE_HOME = str(tmp_path / "state")
    monkeypatch.setenv("XDG_STATE_HOME", STATE_HOME)


def cli(*argv, env=None):
    """Run edge-audit as a user would: a separate process."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AUDIT_")}
    full_env["XDG_STATE_HOME"] = STATE_HOME  # pins of this test session, never the user's
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "ledger.audit_cli", *argv], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=120)


def run_main(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def ledger_setup(anvil, tmp_path, test_pki):
    """A journal of N records (half with signed envelopes when security.envelope exists), anchored."""
    w3 = connect(anvil.rpc_url)
    key = anvil.private_keys[RECORDER_KEY]
    address = deploy_contract(w3, key)  # a contract of this test's own
    journal = Journal(tmp_path / "journal.db")
    checkpointer = make_log(journal)
    signer = _signer(test_pki)
    records = []
    for i in range(N):
        envelope = pem = fp = None
        if signer is not None and i % 2 == 0:
            sign, pem = signer
            envelope, fp = sign(f"payload {i}".encode()), certificate_fingerprint(pem)
        rec = make_record(i, agent=f"agent-{i % 3}", task_name="edge.ingest" if i % 4 else "edge.command_result",
                          status="SUCCESS" if i % 5 else "FAILURE", received_at=1_700_000_000 + i,
                          envelope=envelope, fingerprint=fp)
        journal.append(rec, envelope=envelope, certificate_pem=pem)
        records.append(rec)
    checkpointer.checkpoint()
    writer = ChainWriter(journal, anvil.rpc_url, key, contract_address=address, max_batch=5)
    assert writer.anchor_pending() == N
    yield {"journal": journal, "path": tmp_path / "journal.db", "w3": w3, "contract": address,
           "records": records, "writer": writer, "signed": signer is not None, "log": checkpointer}
    journal.close()


def _signer(test_pki):
    try:
        from security.envelope import sign_envelope
    except ImportError:
        return None
    cert_path, key_path = test_pki.client("audit-agent")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    pem = cert_path.read_text()
    return (lambda payload: sign_envelope(key, pem, payload)), pem


def _verify_json(path, *extra):
    proc = cli("--journal", str(path), "verify", "--json", *extra)
    return proc.returncode, json.loads(proc.stdout)


def test_verify_passes_on_a_clean_ledger(ledger_setup):
    code, report = _verify_json(ledger_setup["path"])
    assert code == 0 and report["ok"], report["findings"]
    assert report["rows"] == N and report["on_chain"] == N and report["events"] == 1  # one checkpoint anchored
    assert report["tree_size"] == N and report["anchored_checkpoints"] == 1
    if ledger_setup["signed"]:
        assert report["signatures_ok"] == N // 2 and report["signatures_not_checked"] == 0
    else:
        assert "not checked" in report["signature_note"]
    proc = cli("--journal", str(ledger_setup["path"]), "verify")
    assert proc.returncode == 0 and "RESULT: OK" in proc.stdout


def test_tampered_journal_row_is_reported(ledger_setup):
    victim = ledger_setup["records"][3].task_id
    other = ledger_setup["records"][4]
    conn = ledger_setup["journal"].db.conn
    conn.execute("UPDATE executions SET status = 'SUCCESS', result_digest = ? WHERE task_id = ?", ("00" * 32, victim))
    # a smarter forger also rewrites the stored digest: the chain still disagrees
    forged = make_record(99, task_id=other.task_id)
    conn.execute("UPDATE executions SET args_digest = ?, digest = ? WHERE task_id = ?",
                 (forged.args_digest, "11" * 32, other.task_id))
    code, report = _verify_json(ledger_setup["path"])
    assert code == 1 and not report["ok"]
    kinds = {(f["task_id"], f["kind"]) for f in report["findings"]}
    assert (victim, "journal_digest_mismatch") in kinds and (victim, "record_not_in_log") in kinds
    assert (other.task_id, "record_not_in_log") in kinds
    proc = cli("--journal", str(ledger_setup["path"]), "verify")
    assert proc.returncode == 1 and "RESULT: FAILED" in proc.stdout and victim in proc.stdout


def test_forged_chain_events_are_reported(ledger_setup, anvil):
    w3, address = ledger_setup["w3"], ledger_setup["contract"]
    origin = ledger_setup["log"].origin
    forger = Account.from_key(anvil.private_keys[FORGER_KEY])
    # anyone may anchor anything for our origin: ignored, but shown
    _send(w3, forger, address, contract.encode_anchor_checkpoint(contract.origin_hash(origin), N, b"\x42" * 32))
    # and a record whose journal row was then deleted
    gone = ledger_setup["records"][1].task_id
    ledger_setup["journal"].db.conn.execute("DELETE FROM executions WHERE task_id = ?", (gone,))
    code, report = _verify_json(ledger_setup["path"])
    assert code == 1
    kinds = {f["kind"]: f for f in report["findings"]}
    assert forger.address in kinds["foreign_recorder"]["detail"] and report["other_recorder_events"] == 1
    assert "log index 1" in kinds["record_missing"]["detail"]
    # trusting the forger's address explicitly: its root for our size contradicts the signed one
    code, report = _verify_json(ledger_setup["path"], "--recorder", forger.address)
    assert code == 1 and {"chain_checkpoint_mismatch"} <= {f["kind"] for f in report["findings"]}


def test_tampered_envelope_is_reported(ledger_setup):
    if not ledger_setup["signed"]:
        pytest.skip("security.envelope is not available: signatures are reported as not checked")
    target = ledger_setup["records"][0]
    conn = ledger_setup["journal"].db.conn
    env = json.loads(conn.execute("SELECT envelope FROM executions WHERE task_id = ?", (target.task_id,)).fetchone()[0])
    env["payload"] = "dGFtcGVyZWQ="  # base64("tampered"): the signature no longer matches
    altered = json.dumps(env).encode()
    conn.execute("UPDATE executions SET envelope = ? WHERE task_id = ?", (altered, target.task_id))
    code, report = _verify_json(ledger_setup["path"])
    assert code == 1
    assert {(f["task_id"], f["kind"]) for f in report["findings"]} == {(target.task_id, "envelope_digest_mismatch")}
    # a forger who also rewrites envelope_digest breaks the record digest and the signature
    conn.execute("UPDATE executions SET envelope_digest = ? WHERE task_id = ?",
                 (hashlib.sha256(altered).hexdigest(), target.task_id))
    code, report = _verify_json(ledger_setup["path"])
    kinds = {f["kind"] for f in report["findings"] if f["task_id"] == target.task_id}
    assert code == 1 and {"signature_invalid", "journal_digest_mismatch", "record_not_in_log"} <= kinds
    assert report["signatures_ok"] == N // 2 - 1


def test_reconcile_reports_unanchored_and_missing(ledger_setup, anvil):
    journal = ledger_setup["journal"]
    late = make_record(50)
    journal.append(late)
    proc = cli("--journal", str(ledger_setup["path"]), "reconcile", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["unanchored"] == 1 and report["ok"]
    assert [(f["task_id"], f["kind"]) for f in report["findings"]] == [(late.task_id, "unanchored")]
    # the same journal against another (empty) contract: every anchored checkpoint is missing
    empty = deploy_contract(ledger_setup["w3"], anvil.private_keys[RECORDER_KEY])
    proc = cli("--journal", str(ledger_setup["path"]), "--contract", empty, "reconcile")
    assert proc.returncode == 1 and "missing_on_chain=1" in proc.stdout
    proc = cli("--journal", str(ledger_setup["path"]), "verify", "--require-anchored", "--json")
    assert proc.returncode == 1
    assert [f["task_id"] for f in json.loads(proc.stdout)["findings"]] == [late.task_id]


def test_list_show_export_and_filters(ledger_setup, capsys, tmp_path):
    path = str(ledger_setup["path"])
    code, out, _ = run_main(capsys, "--journal", path, "list", "--agent", "agent-1", "--json")
    rows = json.loads(out)
    assert code == 0 and rows and all(r["agent_id"] == "agent-1" for r in rows)
    assert len(rows) == sum(1 for r in ledger_setup["records"] if r.agent_id == "agent-1")
    code, out, _ = run_main(capsys, "list", "--journal", path, "--status", "FAILURE", "--task-name", "edge.ingest",
                            "--since", "1700000001", "--until", "2023-11-14T22:13:30")
    expected = [r for r in ledger_setup["records"] if r.status == "FAILURE" and r.task_name == "edge.ingest"
                and 1700000001 <= r.received_at < 1700000010]
    assert code == 0 and f"{len(expected)} records" in out
    for r in expected:
        assert r.task_id in out
    target = ledger_setup["records"][7]
    code, out, _ = run_main(capsys, "--journal", path, "--json", "show", target.task_id)
    shown = json.loads(out)
    assert shown["recomputed_digest"] == shown["digest"] == target.digest().hex()
    assert shown["anchor_state"] == "confirmed" and shown["canonical_json"] == target.canonical_json().decode()
    code, out, _ = run_main(capsys, "--journal", path, "show", target.task_id)
    assert code == 0 and "c2sp.org/tlog-proof@v1\nindex 7\n" in out and ledger_setup["log"].origin in out
    assert f"tx {shown['tx_hash']}" in out and "checkpoint anchored: confirmed" in out
    code, out, err = run_main(capsys, "--journal", path, "show", "no-such-task")
    assert code == 1 and "no record" in err
    code, out, _ = run_main(capsys, "--journal", path, "export", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(table) == N and table[0]["digest"]
    dest = tmp_path / "out.jsonl"
    code, _, _ = run_main(capsys, "--journal", path, "export", "-o", str(dest), "--state", "confirmed")
    lines = [json.loads(x) for x in dest.read_text().splitlines()]
    assert code == 0 and len(lines) == N and {x["anchor_state"] for x in lines} == {"confirmed"}


def test_config_from_env_and_toml(ledger_setup, tmp_path):
    env = {"EDGE_AUDIT_JOURNAL": str(ledger_setup["path"])}
    assert cli("verify", "--quiet", env=env).returncode == 0
    conf = tmp_path / "audit.toml"
    conf.write_text(f'journal = "{ledger_setup["path"]}"\nrpc_url = "{ledger_setup["writer"].config.rpc_url}"\n'
                    f'contract = "{ledger_setup["contract"]}"\nlog_chunk = 2\n')
    proc = cli("--config", str(conf), "verify")
    assert proc.returncode == 0, proc.stderr
    assert "scanning blocks" in proc.stderr  # chunked get_logs with progress
    proc = cli("verify", env={"EDGE_AUDIT_CONFIG": str(conf), "EDGE_AUDIT_CONTRACT": "0x" + "00" * 20})
    assert proc.returncode == 2 and "no contract code" in proc.stderr


def test_usage_errors_and_help():
    for sub in ([], ["list"], ["show"], ["verify"], ["reconcile"], ["export"]):
        proc = cli(*sub, "--help")
        assert proc.returncode == 0 and "usage: edge-audit" in proc.stdout
    script = Path(sys.executable).parent / "edge-audit"
    if script.exists():  # the installed console entry point
        proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "verify" in proc.stdout
    proc = cli("--journal", "/nonexistent/j.db", "verify")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = cli("verify")
    assert proc.returncode == 2 and "EDGE_AUDIT_JOURNAL" in proc.stderr


def _send(w3, account, to, data):
    tx = {"to": to, "data": data, "value": 0, "chainId": w3.eth.chain_id, "gas": 500_000, "type": 2,
          "nonce": w3.eth.get_transaction_count(account.address, "pending"), **fee_params(w3)}
    tx_hash = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    assert w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)["status"] == 1


def test_deploy_cli_records_the_contract_in_the_journal(anvil, tmp_path):
    key = anvil.private_keys[8]
    path = tmp_path / "deploy.db"
    args = [sys.executable, "-m", "ledger.deploy", "--journal", str(path), "--rpc-url", anvil.rpc_url]
    first = subprocess.run([*args, "--key", key], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120,
                           env={**os.environ, "EDGE_LEDGER_KEY": key})
    assert again.returncode == 0 and again.stdout == first.stdout  # found, not deployed twice
    journal = Journal(path)
    config = journal.get_config()
    journal.close()
    assert config["contract_address"] in first.stdout and config["chain_id"] == "31337"
    assert config["recorder"] == Account.from_key(key).address
    missing = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "EDGE_LEDGER_KEY"})
    assert missing.returncode == 2 and "EDGE_LEDGER_KEY" in missing.stderr


def test_status_filter_ignores_case(tmp_path, capsys):
    """`--status failure` finds the FAILURE rows (statuses are journaled upper-case)."""
    journal = Journal(tmp_path / "journal.db")
    records = [make_record(i, status="FAILURE" if i == 1 else "SUCCESS") for i in range(3)]
    for record in records:
        journal.append(record)
    journal.close()
    for spelling in ("FAILURE", "failure", "Failure"):
        code, out, _ = run_main(capsys, "--journal", str(tmp_path / "journal.db"), "list", "--status", spelling, "--json")
        assert code == 0 and [r["task_id"] for r in json.loads(out)] == [records[1].task_id]


def test_bundle_verifies_offline_and_names_a_tampered_record(ledger_setup, tmp_path):
    path = str(ledger_setup["path"])
    dest = tmp_path / "bundle.json"
    assert cli("--journal", path, "export", "--bundle", "-o", str(dest)).returncode == 0
    vkey = ledger_setup["log"].signer.verifier().vkey
    pins = str(tmp_path / "offline-pins.json")
    proc = cli("verify", "--bundle", str(dest), "--log-key", vkey, "--pins", pins, "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"] and report["on_chain"] == report["rows"] == N, report["findings"]
    data = json.loads(dest.read_text())
    victim = data["records"][4]
    victim["status"] = "SUCCESS" if victim["status"] != "SUCCESS" else "FAILURE"
    from ledger.record import ExecutionRecord

    victim["digest"] = ExecutionRecord.from_mapping(victim).digest().hex()  # consistent, but not what was logged
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(data))
    proc = cli("verify", "--bundle", str(forged), "--log-key", vkey, "--pins", pins, "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and {(f["task_id"], f["kind"]) for f in report["findings"]} == {
        (victim["task_id"], "record_not_in_log")}
    # a bundle signed by another key is refused outright
    other = make_log(Journal(tmp_path / "other.db")).signer.verifier().vkey
    proc = cli("verify", "--bundle", str(dest), "--log-key", other, "--no-pins", "--json")
    assert proc.returncode == 1 and "checkpoint_signature_invalid" in proc.stdout


def test_pins_catch_a_rewritten_and_resigned_log(ledger_setup, tmp_path):
    from .test_contract_writer_unit import _rebuild_log

    path = str(ledger_setup["path"])
    pins = tmp_path / "pins.json"
    code, report = _verify_json(path, "--pins", str(pins))
    assert code == 0 and report["pinned"] is None and pins.exists()  # first use pins
    code, report = _verify_json(path, "--pins", str(pins))
    assert code == 0 and report["pinned"] == {"size": N}
    conn = ledger_setup["journal"].db.conn
    conn.execute("UPDATE executions SET status = 'REVOKED' WHERE task_id = ?", (ledger_setup["records"][1].task_id,))
    _rebuild_log(ledger_setup["journal"], ledger_setup["log"])
    code, report = _verify_json(path, "--pins", str(pins))
    kinds = {f["kind"] for f in report["findings"]}
    assert code == 1 and {"pin_inconsistent", "chain_checkpoint_mismatch"} <= kinds, report["findings"]
    assert json.loads(pins.read_text())[ledger_setup["log"].origin]["size"] == N  # the pin did not move


def test_witness_quorum_is_required_when_asked(ledger_setup):
    from ledger.tlog.checkpoint import Checkpoint
    from ledger.tlog.cosignature import CosignatureV1Signer

    path = str(ledger_setup["path"])
    witness = CosignatureV1Signer.generate("agent-witness-1")
    args = ("--no-pins", "--witnesses", "1", "--witness-key", witness.verifier().vkey)
    code, report = _verify_json(path, *args)
    assert code == 1 and [f["kind"] for f in report["findings"]] == ["witness_quorum_not_met"]
    conn = ledger_setup["journal"].db.conn
    size, note = conn.execute("SELECT size, note FROM tlog_checkpoint ORDER BY size DESC LIMIT 1").fetchone()
    body = note.split("\n\n")[0] + "\n"
    cosigned = note + witness.cosign(Checkpoint.parse(body)).line()
    conn.execute("UPDATE tlog_checkpoint SET note = ? WHERE size = ?", (cosigned, size))
    code, report = _verify_json(path, *args)
    assert code == 0 and report["ok"], report["findings"]
    proc = cli("--journal", path, "verify", "--witnesses", "2", "--witness-key", witness.verifier().vkey)
    assert proc.returncode == 2 and "--witnesses 2 needs" in proc.stderr


def test_reordered_records_fail_verify(ledger_setup):
    """Swapping two records' log positions (a reorder) names both and exits 1."""
    a, b = ledger_setup["records"][2].task_id, ledger_setup["records"][8].task_id
    conn = ledger_setup["journal"].db.conn
    ia = conn.execute("SELECT log_index FROM executions WHERE task_id = ?", (a,)).fetchone()[0]
    ib = conn.execute("SELECT log_index FROM executions WHERE task_id = ?", (b,)).fetchone()[0]
    conn.execute("UPDATE executions SET log_index = -1 WHERE task_id = ?", (a,))
    conn.execute("UPDATE executions SET log_index = ? WHERE task_id = ?", (ia, b))
    conn.execute("UPDATE executions SET log_index = ? WHERE task_id = ?", (ib, a))
    code, report = _verify_json(ledger_setup["path"])
    assert code == 1 and {(f["task_id"], f["kind"]) for f in report["findings"]} == {
        (a, "record_not_in_log"), (b, "record_not_in_log")}
