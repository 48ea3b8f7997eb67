"""The journal: durable settings, exactly-once append, one transaction with other tables."""

import threading
import uuid

import pytest

from ledger.journal import CONFIRMED, PENDING, SENT, Journal, JournalError

from .helpers import make_record


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.db")
    yield j
    j.close()


def test_wal_and_synchronous_full(journal):
    conn = journal.db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_append_is_idempotent_by_task_id(journal):
    rec = make_record(1)
    assert journal.append(rec) is True
    assert journal.append(rec) is False
    # a redelivery with a different received_at is still the same task: first write wins
    again = make_record(2, task_id=rec.task_id)
    assert journal.append(again) is False
    row = journal.get(rec.task_id)
    assert row["digest"] == rec.digest().hex() and row["anchor_state"] == PENDING
    assert journal.counts() == {PENDING: 1, SENT: 0, CONFIRMED: 0}


def test_transaction_commits_other_tables_atomically(journal):
    rec = make_record(1)
    with journal.transaction() as db:
        db["readings"].insert({"agent_id": "agent-1", "seq": 1, "value": 20.5})
        assert journal.append(rec, db=db)
    assert journal.get(rec.task_id) is not None
    assert journal.db["readings"].count == 1

    failed = make_record(2)
    with pytest.raises(RuntimeError):
        with journal.transaction() as db:
            db["readings"].insert({"agent_id": "agent-1", "seq": 2, "value": 21.0})
            journal.append(failed, db=db)
            raise RuntimeError("worker crashed before commit")
    assert journal.get(failed.task_id) is None
    assert journal.db["readings"].count == 1


def test_other_thread_does_not_see_uncommitted_rows(journal):
    rec = make_record(1)
    seen = []
    with journal.transaction() as db:
        journal.append(rec, db=db)
        t = threading.Thread(target=lambda: seen.append(journal.get(rec.task_id)))
        t.start()
        t.join()
    assert seen == [None]
    assert journal.get(rec.task_id) is not None


def test_envelope_and_certificates_deduped(journal, test_pki):
    from ledger.journal import certificate_fingerprint

    cert_path, _ = test_pki.client("agent-cert")
    pem = cert_path.read_text()
    fp = certificate_fingerprint(pem)
    for n in range(3):
        env = f"envelope {n}".encode()
        assert journal.append(make_record(n, envelope=env, fingerprint=fp), envelope=env, certificate_pem=pem)
    assert journal.db["certificates"].count == 1
    assert journal.certificate(fp) == pem
    with pytest.raises(JournalError, match="does not match"):
        journal.append(make_record(9, fingerprint="00" * 32), certificate_pem=pem)


def test_config(journal):
    journal.set_config(rpc_url="http://x", chain_id=5)
    journal.set_config(chain_id=6)
    assert journal.get_config() == {"rpc_url": "http://x", "chain_id": "6"}


def test_reopen_keeps_rows(tmp_path):
    rec = make_record(1)
    j = Journal(tmp_path / "j.db")
    j.append(rec)
    j.close()
    j2 = Journal(tmp_path / "j.db")
    assert j2.get(rec.task_id)["task_name"] == "edge.ingest"
    j2.close()


def test_digest_survives_the_journal_roundtrip_for_any_record(tmp_path):
    """Whatever the coordinator journals, the auditor recomputes the same digest from the row."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ledger.record import ExecutionRecord

    journal = Journal(tmp_path / "prop.db")
    times = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
    hexd = st.one_of(st.none(), st.text("0123456789abcdef", min_size=64, max_size=64))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(name=st.text(min_size=1, max_size=40), agent=st.text(min_size=1, max_size=40),
           fp=hexd, args=hexd, result=hexd, status=st.sampled_from(["SUCCESS", "FAILURE", "REJECTED", "weird"]),
           received=times, started=st.one_of(st.none(), times), finished=st.one_of(st.none(), times), env=hexd)
    def check(name, agent, fp, args, result, status, received, started, finished, env):
        task_id = str(uuid.uuid4())  # unique per example: a repeated id is (correctly) not re-journaled
        rec = ExecutionRecord(task_id, name, agent, fp, args, result, status, received, started, finished, env)
        journal.append(rec)
        row = journal.get(task_id)
        assert ExecutionRecord.from_mapping(row).digest().hex() == row["digest"] == rec.digest().hex()

    try:
        check()
    finally:
        journal.close()
