"""The journal as a transparency log: leaves in the record's transaction, migration,
checkpoints on interval / after N records, the log key files."""

import sqlite3
import stat
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.checkpointer import Checkpointer
from ledger.journal import Journal
from ledger.logkey import LogKeyError, ensure_log_key, load_verifier
from ledger.tlog.checkpoint import open_checkpoint
from ledger.tlog.merkle import leaf_hash, root_of, verify_inclusion
from ledger.tlog.note import Ed25519Signer

from .helpers import make_record


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.db")
    yield j
    j.close()


def test_every_record_is_the_next_leaf_in_its_own_transaction(journal):
    recs = [make_record(i) for i in range(5)]
    for r in recs:
        assert journal.append(r)
    assert not journal.append(recs[0])  # a duplicate adds no leaf
    failed = make_record(9)
    with pytest.raises(RuntimeError):
        with journal.transaction() as db:
            journal.append(failed, db=db)
            raise RuntimeError("crash before commit")
    assert journal.tree_size() == 5 and journal.get(failed.task_id) is None
    late = make_record(10)
    assert journal.append(late)  # after the rollback the in-memory tree was dropped, not reused
    all_recs = recs + [late]
    assert [journal.get(r.task_id)["log_index"] for r in all_recs] == list(range(6))
    log = journal.merkle()
    assert log.root() == root_of([r.canonical_json() for r in all_recs])
    verify_inclusion(leaf_hash(late.canonical_json()), 5, 6, log.inclusion_proof(5), log.root())


def test_appends_from_two_threads_keep_one_tree(journal):
    def worker(offset):
        for i in range(50):
            journal.append(make_record(offset + i))

    threads = [threading.Thread(target=worker, args=(k * 100,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = list(journal.rows(order="log_index"))
    assert [r["log_index"] for r in rows] == list(range(150))
    from ledger.record import ExecutionRecord

    assert journal.merkle().root() == root_of([ExecutionRecord.from_mapping(r).canonical_json() for r in rows])


def test_old_journal_rows_join_the_log_on_open(tmp_path):
    path = tmp_path / "old.db"
    j = Journal(path)
    recs = [make_record(i) for i in range(4)]
    for r in recs:
        j.append(r)
    j.close()
    conn = sqlite3.connect(path)  # as a journal from before the log: no index, no nodes
    conn.execute("DROP INDEX executions_log_index")
    conn.execute("UPDATE executions SET log_index = NULL")
    conn.execute("DELETE FROM tlog_node")
    conn.commit()
    conn.close()
    j = Journal(path)
    assert [j.get(r.task_id)["log_index"] for r in recs] == [0, 1, 2, 3]
    assert j.merkle().root() == root_of([r.canonical_json() for r in recs])
    j.close()


def test_checkpoints_after_n_records_and_on_interval(journal):
    signer = Ed25519Signer.generate("edgeledger/test/cp")
    cp = Checkpointer(journal, signer, interval=3600, every=3)
    assert cp.checkpoint() is None  # empty log: nothing to sign
    journal.append(make_record(1))
    assert not cp.due(last_at=float("inf"))  # 1 new record, interval not reached
    for i in range(2, 4):
        journal.append(make_record(i))
    assert cp.due(last_at=float("inf"))  # 3 new records
    assert cp.checkpoint() == {"size": 3} and cp.checkpoint() is None
    journal.append(make_record(4))
    assert cp.due(last_at=time.monotonic() - 7200)  # interval elapsed
    stop = threading.Event()
    thread = threading.Thread(target=Checkpointer(journal, signer, interval=0.01, every=100).run, args=(stop, 0.005))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while (journal.latest_checkpoint() or {}).get("size") != 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    latest = journal.latest_checkpoint()
    checkpoint, _ = open_checkpoint(latest["note"], signer.verifier())
    assert checkpoint.size == 4 and checkpoint.root_hash == journal.merkle().root(4)
    assert [c["size"] for c in journal.checkpoints()] == [3, 4]


def test_the_run_thread_announces_every_new_checkpoint_whoever_signed_it(journal):
    """`on_new` (the chain writer's wake-up) fires once the run thread sees a newer committed
    checkpoint: one it signed on its interval, and one the every-N hook signed inside an
    append's transaction."""
    signer = Ed25519Signer.generate("edgeledger/test/announce")
    cp = Checkpointer(journal, signer, interval=3600, every=2).attach()
    told: list[int] = []
    cp.on_new = lambda: told.append((journal.latest_checkpoint() or {}).get("size", 0))
    stop = threading.Event()
    thread = threading.Thread(target=cp.run, args=(stop, 0.005))
    thread.start()

    def wait_for(count):
        deadline = time.monotonic() + 30
        while len(told) < count and time.monotonic() < deadline:
            time.sleep(0.005)

    try:
        time.sleep(0.05)
        assert told == []  # nothing new: nothing announced
        journal.append(make_record(1))
        journal.append(make_record(2))  # the hook signs size 2 inside this append
        wait_for(1)
        assert told == [2]
        journal.append(make_record(3))
        cp.interval = 0.0  # now the run thread's own interval signs size 3
        wait_for(2)
        assert told == [2, 3]
        time.sleep(0.05)
        assert told == [2, 3]  # each checkpoint announced once
    finally:
        stop.set()
        thread.join()


def test_log_key_files(tmp_path):
    pki = tmp_path / "pki"
    signer = ensure_log_key(pki, "edgeledger/0123456789abcdef/coordinator")
    assert stat.S_IMODE((pki / "log.key").stat().st_mode) == 0o600
    assert load_verifier(pki / "log.pub").vkey == signer.verifier().vkey
    assert ensure_log_key(pki, signer.name).skey == signer.skey  # loaded, not regenerated
    with pytest.raises(LogKeyError, match="signs for log"):
        ensure_log_key(pki, "edgeledger/other/coordinator")


def test_vkey_strings_with_double_slashes_load_as_given(tmp_path):
    """A vkey's base64 may contain '//': it must never pass through Path (which folds it)."""
    # Deterministic seeds (about 1 key in 100 has '//' in its base64): the same key every run.
    signer = next(s for s in (Ed25519Signer("edgeledger/test/slashes",
                                            Ed25519PrivateKey.from_private_bytes(i.to_bytes(32, "big")))
                              for i in range(10_000)) if "//" in s.verifier().vkey)
    assert load_verifier(signer.verifier().vkey).vkey == signer.verifier().vkey


def test_checkpoints_only_grow_and_every_n_are_signed_in_the_append(journal):
    """A checkpoint signed from an older view and stored late is refused (it would wedge
    anchoring: the contract refuses sizes below an anchored one)."""
    signer = Ed25519Signer.generate("edgeledger/test/hook")
    cp = Checkpointer(journal, signer, interval=3600, every=4).attach()
    for i in range(10):
        journal.append(make_record(i))
    assert [c["size"] for c in journal.checkpoints()] == [4, 8]  # signed inside the appends
    stale_root = journal.merkle().root(6)
    from ledger.tlog.checkpoint import Checkpoint, sign_checkpoint

    assert not journal.add_checkpoint(6, stale_root, sign_checkpoint(Checkpoint(cp.origin, 6, stale_root), signer))
    assert cp.checkpoint() == {"size": 10}
    assert [c["size"] for c in journal.checkpoints()] == [4, 8, 10]
    for c in journal.checkpoints():
        checkpoint, _ = open_checkpoint(c["note"], signer.verifier())
        assert checkpoint.root_hash == journal.merkle().root(c["size"])
