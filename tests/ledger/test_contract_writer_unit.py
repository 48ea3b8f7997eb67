"""Contract rules and writer logic on an in-process eth-tester chain (py-evm)."""

import pytest
from eth_account import Account

from ledger import contract
from ledger.audit import audit, fetch_events
from ledger.deploy import create_address, ensure_deployed, fee_params
from ledger.journal import CONFIRMED, Journal
from ledger.writer import ChainWriter

from .helpers import make_record, eth_tester_chain


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


def test_deploy_is_deterministic_and_reused(chain, journal):
    w3, keys = chain
    cfg = ensure_deployed(journal, w3, keys[0])
    assert cfg.contract_address == create_address(Account.from_key(keys[0]).address, 0)
    assert ensure_deployed(journal, w3, keys[0]).contract_address == cfg.contract_address
    assert w3.eth.get_transaction_count(cfg.recorder) == 1  # second call deployed nothing
    saved = journal.get_config()
    assert saved["contract_address"] == cfg.contract_address and saved["chain_id"] == str(w3.eth.chain_id)


def test_contract_skips_duplicate_task_per_recorder(chain, journal):
    w3, keys = chain
    cfg = ensure_deployed(journal, w3, keys[0])
    rec = make_record(1)
    args = (rec.task_key, rec.agent_key, rec.digest(), rec.status_code, rec.finished_at_ms)
    first = _send(w3, keys[0], cfg.contract_address, contract.encode_record(*args))
    again = _send(w3, keys[0], cfg.contract_address, contract.encode_record(*args))
    other = _send(w3, keys[1], cfg.contract_address, contract.encode_record(*args))
    assert (len(first["logs"]), len(again["logs"]), len(other["logs"])) == (1, 0, 1)
    event = contract.decode_event(first["logs"][0])
    assert event.task_key == rec.task_key and event.digest == rec.digest()
    assert event.recorder == Account.from_key(keys[0]).address and event.finished_ms == rec.finished_at_ms
    raw = w3.eth.call({"to": cfg.contract_address,
                       "data": contract.encode_digests_of(cfg.recorder, [rec.task_key, b"\1" * 32])})
    assert contract.decode_digests_of(bytes(raw)) == [rec.digest(), b"\0" * 32]


def test_record_batch_rejects_mismatched_lengths_and_zero_digest(chain, journal):
    w3, keys = chain
    cfg = ensure_deployed(journal, w3, keys[0])
    bad = contract.encode_record_batch([b"\1" * 32], [], [b"\2" * 32], [1], [0])
    assert _send(w3, keys[0], cfg.contract_address, bad)["status"] == 0
    zero = contract.encode_record_batch([b"\1" * 32], [b"\1" * 32], [b"\0" * 32], [1], [0])
    assert _send(w3, keys[0], cfg.contract_address, zero)["status"] == 0


def test_writer_anchors_in_batches_and_audit_passes(chain, journal):
    w3, keys = chain
    recs = _fill(journal, 25)
    writer = ChainWriter(journal, w3, keys[0], max_batch=10, in_flight=2)
    assert writer.anchor_pending() == 25
    assert writer.stats.batches == 3
    assert journal.counts()[CONFIRMED] == 25
    row = journal.get(recs[0].task_id)
    assert row["tx_hash"].startswith("0x") and row["block_number"] >= 1
    events = fetch_events(w3, writer.contract_address)
    assert sorted(len(v) for v in events.values()) == [1] * 25
    report = audit(journal, events, [writer.address], check_signatures=False)
    assert report.ok and report.on_chain == 25, report.findings
    assert writer.anchor_pending() == 0


def test_resend_after_lost_receipt_never_records_twice(chain, journal):
    """Rows re-marked pending (as after a receipt timeout) are skipped on chain, confirmed in journal."""
    w3, keys = chain
    recs = _fill(journal, 12)
    writer = ChainWriter(journal, w3, keys[0], max_batch=5)
    writer.anchor_pending()
    journal.mark_pending([r.task_id for r in recs[:7]])
    _fill(journal, 3)
    assert writer.anchor_pending() == 10
    assert journal.counts()[CONFIRMED] == 15
    events = fetch_events(w3, writer.contract_address)
    assert len(events) == 15 and all(len(v) == 1 for v in events.values())
    assert audit(journal, events, [writer.address], check_signatures=False).ok


def test_sent_rows_from_a_crashed_run_are_resolved(chain, journal):
    w3, keys = chain
    recs = _fill(journal, 6)
    writer = ChainWriter(journal, w3, keys[0], max_batch=3)
    writer.anchor_pending()
    # a crash after mark_sent: one batch 'sent' with a known tx, one with a tx that never existed
    journal.mark_sent([r.task_id for r in recs[:3]], journal.get(recs[0].task_id)["tx_hash"], 1, "x")
    more = _fill(journal, 2)
    journal.mark_sent([r.task_id for r in more], "0x" + "11" * 32, 1, "x")
    fresh = ChainWriter(journal, w3, keys[0], max_batch=3)
    assert fresh.anchor_pending() == 2
    assert journal.counts()[CONFIRMED] == 8
    events = fetch_events(w3, fresh.contract_address)
    assert all(len(v) == 1 for v in events.values()) and len(events) == 8


def test_gas_covers_calldata_floor(chain, journal):
    w3, keys = chain
    _fill(journal, 3)
    writer = ChainWriter(journal, w3, keys[0])
    writer.anchor_pending()
    data = contract.encode_record_batch([b"\xff" * 32] * 100, [b"\xff" * 32] * 100, [b"\xff" * 32] * 100,
                                        [255] * 100, [2**63] * 100)
    assert writer._gas_for(100, data) >= contract.calldata_floor_gas(data)
    assert contract.calldata_floor_gas(b"\0\1") == 21_000 + 10 * (1 + 4)


def test_hand_rolled_batch_encoding_matches_eth_abi():
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


def test_switching_contract_re_anchors_on_the_new_one(chain, journal):
    w3, keys = chain
    _fill(journal, 4)
    first = ChainWriter(journal, w3, keys[0])
    first.anchor_pending()
    from ledger.deploy import deploy_contract

    other = deploy_contract(w3, keys[0])
    moved = ChainWriter(journal, w3, keys[0], contract_address=other)
    assert moved.anchor_pending() == 4
    events = fetch_events(w3, other)
    assert len(events) == 4 and audit(journal, events, [moved.address], check_signatures=False).ok


def test_audit_without_a_signature_verifier_says_not_checked(chain, journal):
    w3, keys = chain
    env = b'{"v":1}'
    journal.append(make_record(1, envelope=env), envelope=env)
    journal.append(make_record(2))
    writer = ChainWriter(journal, w3, keys[0])
    writer.anchor_pending()
    report = audit(journal, fetch_events(w3, writer.contract_address), [writer.address], verifier=None)
    assert report.ok and report.signatures_not_checked == 1 and report.no_envelope == 1
    assert "not checked" in report.signature_note
