"""Contract rules, writer logic and the log audit on an in-process eth-tester chain (py-evm).

Checkpoint anchoring replaced per-record anchoring (issue #12): these tests check the
contract's checkpoint rules, that the writer anchors the stored signed checkpoints
exactly once (also after lost receipts and crashes), and that the audit names each
way of rewriting the log.
"""

import pytest
from eth_account import Account

from ledger import contract
from ledger.audit import audit, fetch_events
from ledger.deploy import create_address, ensure_deployed, fee_params
from ledger.journal import CONFIRMED, PENDING, SENT, Journal
from ledger.pins import PinStore
from ledger.tlog.checkpoint import Checkpoint, sign_checkpoint
from ledger.tlog.merkle import MerkleLog, SQLiteNodeStore
from ledger.writer import ChainWriter

from .helpers import eth_tester_chain, log_policy, make_log, make_record


@pytest.fixture
def chain():
    return eth_tester_chain()


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.db")
    yield j
    j.close()


def _send(w3, key, to, data):
    acct = Account.from_key(key)
    tx = {"to": to, "data": data, "value": 0, "chainId": w3.eth.chain_id, "gas": 3_000_000, "type": 2,
          "nonce": w3.eth.get_transaction_count(acct.address), **fee_params(w3)}
    h = w3.eth.send_raw_transaction(acct.sign_transaction(tx).raw_transaction)
    return w3.eth.wait_for_transaction_receipt(h, timeout=30)


def _fill(journal, n, **kw):
    recs = [make_record(i, **kw) for i in range(n)]
    for r in recs:
        assert journal.append(r)
    return recs


def _audit(journal, w3, writer, cp, **kw):
    events = fetch_events(w3, writer.contract_address, cp.origin)
    return audit(journal, events, [writer.address], log_policy(cp, kw.pop("pins", None)), check_signatures=False, **kw)


def test_deploy_is_deterministic_and_reused(chain, journal):
    w3, keys = chain
    cfg = ensure_deployed(journal, w3, keys[0])
    assert cfg.contract_address == create_address(Account.from_key(keys[0]).address, 0)
    assert ensure_deployed(journal, w3, keys[0]).contract_address == cfg.contract_address
    assert w3.eth.get_transaction_count(cfg.recorder) == 1  # second call deployed nothing
    saved = journal.get_config()
    assert saved["contract_address"] == cfg.contract_address and saved["chain_id"] == str(w3.eth.chain_id)


def test_contract_checkpoint_sizes_must_grow_per_recorder_and_origin(chain, journal):
    w3, keys = chain
    cfg = ensure_deployed(journal, w3, keys[0])
    origin = contract.origin_hash("edgeledger/test/a")
    first = _send(w3, keys[0], cfg.contract_address, contract.encode_anchor_checkpoint(origin, 10, b"\1" * 32))
    again = _send(w3, keys[0], cfg.contract_address, contract.encode_anchor_checkpoint(origin, 10, b"\1" * 32))
    assert (first["status"], len(first["logs"]), again["status"], len(again["logs"])) == (1, 1, 1, 0)
    event = contract.decode_checkpoint_event(first["logs"][0])
    assert (event.origin_key, event.size, event.root) == (origin, 10, b"\1" * 32)
    assert event.recorder == Account.from_key(keys[0]).address
    # another root for an anchored size, or a smaller size: refused
    for size, root in ((10, b"\2" * 32), (5, b"\3" * 32)):
        assert _send(w3, keys[0], cfg.contract_address, contract.encode_anchor_checkpoint(origin, size, root))["status"] == 0
    # another recorder or another origin has its own sequence
    assert len(_send(w3, keys[1], cfg.contract_address, contract.encode_anchor_checkpoint(origin, 5, b"\3" * 32))["logs"]) == 1
    other = contract.origin_hash("edgeledger/test/b")
    assert len(_send(w3, keys[0], cfg.contract_address, contract.encode_anchor_checkpoint(other, 1, b"\4" * 32))["logs"]) == 1
    raw = w3.eth.call({"to": cfg.contract_address, "data": contract.encode_roots_of(cfg.recorder, origin, [10, 5])})
    assert contract.decode_roots_of(bytes(raw)) == [b"\1" * 32, b"\0" * 32]
    # batches: lengths must match, roots must not be zero
    bad = contract.encode_anchor_checkpoints(origin, [11, 12], [b"\5" * 32])
    assert _send(w3, keys[0], cfg.contract_address, bad)["status"] == 0
    zero = contract.encode_anchor_checkpoints(origin, [11], [b"\0" * 32])
    assert _send(w3, keys[0], cfg.contract_address, zero)["status"] == 0


def test_writer_anchors_checkpoints_and_audit_passes(chain, journal):
    w3, keys = chain
    cp = make_log(journal)
    recs = _fill(journal, 10)
    cp.checkpoint()
    _fill(journal, 15)
    cp.checkpoint()
    writer = ChainWriter(journal, w3, keys[0], max_batch=1, in_flight=2)
    assert writer.anchor_pending() == 25
    assert writer.stats.batches == 2
    assert journal.counts()[CONFIRMED] == 25 and journal.checkpoint_counts()[CONFIRMED] == 2
    row = journal.get(recs[0].task_id)
    assert row["tx_hash"].startswith("0x") and row["block_number"] >= 1 and row["log_index"] == 0
    events = fetch_events(w3, writer.contract_address, cp.origin)
    assert sorted(e.size for e in events) == [10, 25]  # one event per checkpoint, none per record
    report = _audit(journal, w3, writer, cp)
    assert report.ok and report.on_chain == 25 and report.anchored_checkpoints == 2, report.findings
    assert writer.anchor_pending() == 0
    # rows journaled after the last checkpoint are not anchored yet
    late = _fill(journal, 2)
    report = _audit(journal, w3, writer, cp, require_anchored=True)
    assert {(f.task_id, f.kind) for f in report.findings} == {(r.task_id, "unanchored_required") for r in late}


def test_resend_after_lost_receipt_never_anchors_twice(chain, journal):
    """Checkpoints re-marked pending (as after a receipt timeout) are skipped on chain, confirmed in journal."""
    w3, keys = chain
    cp = make_log(journal)
    for _ in range(3):
        _fill(journal, 4)
        cp.checkpoint()
    writer = ChainWriter(journal, w3, keys[0], max_batch=2)
    writer.anchor_pending()
    journal.checkpoints_reset([4, 8])
    assert journal.checkpoint_counts()[PENDING] == 2
    _fill(journal, 3)
    cp.checkpoint()
    assert writer.anchor_pending() == 3  # rows newly covered: 12 -> 15
    assert journal.counts()[CONFIRMED] == 15
    events = fetch_events(w3, writer.contract_address, cp.origin)
    assert sorted(e.size for e in events) == [4, 8, 12, 15]
    assert _audit(journal, w3, writer, cp).ok


def test_sent_checkpoints_from_a_crashed_run_are_resolved(chain, journal):
    w3, keys = chain
    cp = make_log(journal)
    _fill(journal, 6)
    cp.checkpoint()
    writer = ChainWriter(journal, w3, keys[0])
    writer.anchor_pending()
    tx = journal.latest_checkpoint()["tx_hash"]
    _fill(journal, 2)
    cp.checkpoint()
    # a crash after marking sent: one checkpoint 'sent' with a known tx, one with a tx that never existed
    conn = journal.db.conn
    conn.execute("UPDATE tlog_checkpoint SET anchor_state = ?, tx_hash = ? WHERE size = 6", (SENT, tx))
    conn.execute("UPDATE tlog_checkpoint SET anchor_state = ?, tx_hash = ? WHERE size = 8", (SENT, "0x" + "11" * 32))
    fresh = ChainWriter(journal, w3, keys[0])
    fresh.anchor_pending()
    assert journal.counts()[CONFIRMED] == 8 and journal.checkpoint_counts()[CONFIRMED] == 2
    assert sorted(e.size for e in fetch_events(w3, fresh.contract_address, cp.origin)) == [6, 8]


def test_gas_covers_calldata_floor(chain, journal):
    w3, keys = chain
    cp = make_log(journal)
    _fill(journal, 3)
    cp.checkpoint()
    writer = ChainWriter(journal, w3, keys[0])
    writer.anchor_pending()
    data = contract.encode_anchor_checkpoints(b"\xff" * 32, list(range(100, 200)), [b"\xff" * 32] * 100)
    assert writer._gas_for(100, data) >= contract.calldata_floor_gas(data)
    assert contract.calldata_floor_gas(b"\0\1") == 21_000 + 10 * (1 + 4)


def test_hand_rolled_legacy_batch_encoding_matches_eth_abi():
    import os

    for n in (0, 1, 7, 100):
        cols = ([os.urandom(32) for _ in range(n)], [os.urandom(32) for _ in range(n)],
                [os.urandom(32) for _ in range(n)], [i % 256 for i in range(n)], [2**64 - 1 - i for i in range(n)])
        assert contract.encode_record_batch(*cols) == contract.encode_record_batch_reference(*cols)
    with pytest.raises(ValueError):
        contract.encode_record_batch([b"\1" * 32], [b"\1" * 32], [b"\1" * 32], [256], [0])


def test_signing_uses_coincurve():
    from ledger.writer import fast_signing

    assert fast_signing(), "eth-keys is not using coincurve: pip install coincurve"


def test_switching_contract_re_anchors_the_same_checkpoints_on_the_new_one(chain, journal):
    w3, keys = chain
    cp = make_log(journal)
    _fill(journal, 4)
    cp.checkpoint()
    first = ChainWriter(journal, w3, keys[0])
    first.anchor_pending()
    before = journal.checkpoints()
    from ledger.deploy import deploy_contract

    other = deploy_contract(w3, keys[0])
    moved = ChainWriter(journal, w3, keys[0], contract_address=other)
    assert moved.anchor_pending() == 4
    events = fetch_events(w3, other, cp.origin)
    assert [(e.size, e.root.hex()) for e in events] == [(c["size"], c["root"]) for c in before]
    assert [c["note"] for c in journal.checkpoints()] == [c["note"] for c in before]  # same signed history
    assert _audit(journal, w3, moved, cp).ok


def test_audit_without_a_signature_verifier_says_not_checked(chain, journal):
    w3, keys = chain
    cp = make_log(journal)
    env = b'{"v":1}'
    journal.append(make_record(1, envelope=env), envelope=env)
    journal.append(make_record(2))
    cp.checkpoint()
    writer = ChainWriter(journal, w3, keys[0])
    writer.anchor_pending()
    report = audit(journal, fetch_events(w3, writer.contract_address, cp.origin), [writer.address],
                   log_policy(cp), verifier=None)
    assert report.ok and report.signatures_not_checked == 1 and report.no_envelope == 1
    assert "not checked" in report.signature_note


# -- the rewrites the log makes visible -------------------------------------------------------
@pytest.fixture
def anchored(chain, journal):
    w3, keys = chain
    cp = make_log(journal)
    recs = _fill(journal, 8)
    cp.checkpoint()
    recs += _fill(journal, 5)
    cp.checkpoint()
    writer = ChainWriter(journal, w3, keys[0])
    assert writer.anchor_pending() == 13
    assert _audit(journal, w3, writer, cp).ok
    return w3, writer, cp, recs


def _kinds(report):
    return {(f.task_id, f.kind) for f in report.findings}


def test_edited_record_is_not_in_the_log(anchored, journal):
    w3, writer, cp, recs = anchored
    conn = journal.db.conn
    conn.execute("UPDATE executions SET status = 'FAILURE' WHERE task_id = ?", (recs[3].task_id,))
    forged = make_record(99, task_id=recs[9].task_id)  # a smarter forger keeps digest and fields consistent
    conn.execute("UPDATE executions SET args_digest = ?, digest = ? WHERE task_id = ?",
                 (forged.args_digest, "00" * 32, recs[9].task_id))
    row = journal.get(recs[9].task_id)
    from ledger.record import ExecutionRecord

    conn.execute("UPDATE executions SET digest = ? WHERE task_id = ?",
                 (ExecutionRecord.from_mapping(row).digest().hex(), recs[9].task_id))
    report = _audit(journal, w3, writer, cp)
    assert not report.ok
    assert {(recs[3].task_id, "record_not_in_log"), (recs[3].task_id, "journal_digest_mismatch"),
            (recs[9].task_id, "record_not_in_log")} == _kinds(report)


def test_deleted_and_reordered_records_are_named(anchored, journal):
    w3, writer, cp, recs = anchored
    conn = journal.db.conn
    conn.execute("DELETE FROM executions WHERE task_id = ?", (recs[2].task_id,))
    a, b = journal.get(recs[5].task_id)["log_index"], journal.get(recs[6].task_id)["log_index"]
    conn.execute("UPDATE executions SET log_index = -1 WHERE task_id = ?", (recs[5].task_id,))
    conn.execute("UPDATE executions SET log_index = ? WHERE task_id = ?", (a, recs[6].task_id))
    conn.execute("UPDATE executions SET log_index = ? WHERE task_id = ?", (b, recs[5].task_id))
    report = _audit(journal, w3, writer, cp)
    assert _kinds(report) == {(None, "record_missing"), (recs[5].task_id, "record_not_in_log"),
                              (recs[6].task_id, "record_not_in_log")}
    assert "log index 2" in next(f.detail for f in report.findings if f.kind == "record_missing")


def test_rebuilt_and_resigned_log_is_caught_by_the_chain_and_by_the_pin(anchored, journal, tmp_path):
    """The operator edits a record, rebuilds the tree and re-signs checkpoints with the log key."""
    w3, writer, cp, recs = anchored
    pins = PinStore(tmp_path / "pins.json")
    report = _audit(journal, w3, writer, cp, pins=pins)
    pins.update(cp.origin, cp.signer.verifier().vkey, 13, bytes.fromhex(journal.latest_checkpoint()["root"]))
    conn = journal.db.conn
    conn.execute("UPDATE executions SET status = 'FAILURE' WHERE task_id = ?", (recs[0].task_id,))
    _rebuild_log(journal, cp)
    report = _audit(journal, w3, writer, cp, pins=pins)
    kinds = {k for _, k in _kinds(report)}
    assert "chain_checkpoint_mismatch" in kinds and "pin_inconsistent" in kinds, report.findings
    assert report.on_chain == 0  # no record counts as anchored under a root the chain does not hold


def _rebuild_log(journal, cp):
    """What a forger with the database and the log key can do: a whole new tree and checkpoints."""
    from ledger.record import ExecutionRecord

    conn = journal.db.conn
    conn.execute("DELETE FROM tlog_node")
    rows = list(journal.rows(order="log_index"))
    for row in rows:
        conn.execute("UPDATE executions SET digest = ? WHERE task_id = ?",
                     (ExecutionRecord.from_mapping(row).digest().hex(), row["task_id"]))
    log = MerkleLog(SQLiteNodeStore(conn, "tlog_node"))
    log.extend(ExecutionRecord.from_mapping(r).canonical_json() for r in rows)
    for c in journal.checkpoints():
        new = Checkpoint(cp.origin, c["size"], log.root(c["size"]))
        conn.execute("UPDATE tlog_checkpoint SET root = ?, note = ? WHERE size = ?",
                     (new.root_hash.hex(), sign_checkpoint(new, cp.signer), c["size"]))
