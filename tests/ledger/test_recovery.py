"""Crash recovery on a real anvil: SIGKILL mid-batch, restart from snapshot, chain wiped.

After each recovery `edge-audit verify` passes, every journal row is covered by an
anchored checkpoint, and every stored checkpoint is on chain exactly once, with the
root it was signed with (the contract skips an (size, root) its recorder already
anchored; re-anchoring re-publishes the stored checkpoints, never new ones).
Adapted from per-record anchoring (issue #12).
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ledger.audit import fetch_events
from ledger.deploy import connect
from ledger.journal import CONFIRMED, PENDING, SENT, Journal
from ledger.writer import ChainWriter
from tests.support.anvil import start_anvil

from .helpers import make_log, make_record

REPO = Path(__file__).resolve().parents[2]


def _fill(journal, n, start=0):
    for i in range(start, start + n):
        assert journal.append(make_record(i))


def _wait(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _all_confirmed(journal, total):
    counts = journal.counts()
    return counts[CONFIRMED] == total and counts[PENDING] == 0 and counts[SENT] == 0


def _signed(journal):
    return {c["size"]: c["note"] for c in journal.checkpoints()}


def _assert_exactly_once_and_verified(journal, path, rpc_url, signed_before=None):
    config = journal.get_config()
    events = fetch_events(connect(rpc_url), config["contract_address"], config["log_origin"])
    stored = {c["size"]: c["root"] for c in journal.checkpoints()}
    sizes = [e.size for e in events]
    assert len(sizes) == len(set(sizes)), "a checkpoint was anchored twice"
    assert {e.size: e.root.hex() for e in events} == stored, "chain and journal hold different checkpoints"
    if signed_before is not None:  # re-anchoring published the same signed checkpoints, not new ones
        assert {s: n for s, n in signed_before.items()} == {c["size"]: c["note"] for c in journal.checkpoints()
                                                            if c["size"] in signed_before}
    proc = subprocess.run([sys.executable, "-m", "ledger.audit_cli", "--journal", str(path), "verify", "--json",
                           "--require-anchored", "--pins", str(path.parent / "pins.json")], capture_output=True,
                          text=True, cwd=REPO, timeout=120, env={**os.environ})
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], report["findings"][:5]
    assert report["on_chain"] == journal.counts()[CONFIRMED] == len(list(journal.rows()))


def test_sigkill_mid_batch_restart_from_snapshot_then_wipe(tmp_path):
    path = tmp_path / "journal.db"
    journal = Journal(path)
    checkpointer = make_log(journal, interval=0.05, every=50)
    with start_anvil(tmp_path) as chain:
        _fill(journal, 4000)
        writer = ChainWriter(journal, chain.rpc_url, chain.dev_key, max_batch=1, in_flight=2, receipt_timeout=15)
        stop = threading.Event()
        thread = threading.Thread(target=writer.run, args=(stop, 0.05), daemon=True)
        signing = threading.Thread(target=checkpointer.run, args=(stop, 0.01), daemon=True)
        # checkpoints of 10 records each, one per transaction: the kill lands mid-anchoring
        for start in range(10, 4001, 10):
            journal.add_checkpoint(start, journal.merkle().root(start), _note(checkpointer, start))
        thread.start()
        signing.start()
        try:
            _wait(lambda: journal.counts()[CONFIRMED] >= 400, what="first anchors")
            chain.snapshot()
            _wait(lambda: journal.counts()[CONFIRMED] >= 1200, what="anchors after the snapshot")
            chain.kill()  # SIGKILL while batches are in flight
            counts = journal.counts()
            assert counts[PENDING] + counts[SENT] > 0, "anchoring finished before the kill: nothing tested"
            _fill(journal, 300, start=4000)  # work keeps arriving while the chain is down
            chain.start()
            assert chain.loaded_from is not None and chain.loaded_from.name == "anvil-state.json"
            _wait(lambda: _all_confirmed(journal, 4300), what="re-anchoring after restart")
            assert writer.stats.resent > 0  # blocks after the snapshot were lost and re-sent
            _assert_exactly_once_and_verified(journal, path, chain.rpc_url)
            before_wipe = _signed(journal)
            chain.snapshot()  # a reloaded chain with history still gives consistent snapshots

            chain.kill()
            for f in (tmp_path / "state").glob("*.json"):
                f.unlink()  # the chain is gone entirely
            chain.start()
            assert chain.loaded_from is None
            _fill(journal, 100, start=4300)
            _wait(lambda: _all_confirmed(journal, 4400), what="re-anchoring on a wiped chain")
            assert writer.stats.redeployed >= 1
            _assert_exactly_once_and_verified(journal, path, chain.rpc_url, before_wipe)
        finally:
            stop.set()
            thread.join(timeout=60)
            journal.close()
    assert not thread.is_alive()


def test_receipt_timeout_then_dropped_or_late_mined_tx(tmp_path):
    import pytest

    from ledger.anvil import rpc_call
    from ledger.writer import ChainWriterError

    journal = Journal(tmp_path / "journal.db")
    checkpointer = make_log(journal)
    with start_anvil(tmp_path) as chain:
        writer = ChainWriter(journal, chain.rpc_url, chain.dev_key, max_batch=5, in_flight=1, receipt_timeout=1.0)
        assert writer.contract_address  # deploy while blocks are still mined
        _fill(journal, 5)
        checkpointer.checkpoint()
        rpc_call(chain.rpc_url, "evm_setAutomine", [False])
        try:
            with pytest.raises(ChainWriterError, match="no receipt"):
                writer.anchor_pending()
            assert journal.checkpoint_counts()[SENT] == 1
            rpc_call(chain.rpc_url, "anvil_dropAllTransactions")  # the tx is lost for good
        finally:
            rpc_call(chain.rpc_url, "evm_setAutomine", [True])
        assert writer.anchor_pending() == 5  # noticed the nonce gap, re-sent
        assert _all_confirmed(journal, 5)

        _fill(journal, 5, start=5)
        checkpointer.checkpoint()
        rpc_call(chain.rpc_url, "evm_setAutomine", [False])
        try:
            with pytest.raises(ChainWriterError, match="no receipt"):
                writer.anchor_pending()
            rpc_call(chain.rpc_url, "anvil_mine", ["0x1"])  # mined after we gave up waiting
        finally:
            rpc_call(chain.rpc_url, "evm_setAutomine", [True])
        writer.anchor_pending()
        assert _all_confirmed(journal, 10)
        _assert_exactly_once_and_verified(journal, tmp_path / "journal.db", chain.rpc_url)
    journal.close()


def _note(checkpointer, size):
    from ledger.tlog.checkpoint import Checkpoint, sign_checkpoint

    return sign_checkpoint(Checkpoint(checkpointer.origin, size, checkpointer.journal.merkle().root(size)),
                           checkpointer.signer)


def test_a_new_checkpoint_wakes_the_idle_writer_at_once(tmp_path):
    """The writer's idle wait ends when the checkpointer announces a new checkpoint, so a
    record waits for the checkpoint timer only, not for the writer's round after it. With a
    one-hour round here, only the wake-up can anchor anything."""
    path = tmp_path / "journal.db"
    journal = Journal(path)
    checkpointer = make_log(journal, interval=0.05, every=1000)
    with start_anvil(tmp_path) as chain:
        writer = ChainWriter(journal, chain.rpc_url, chain.dev_key, receipt_timeout=15)
        checkpointer.on_new = writer.wake.set
        stop = threading.Event()
        threads = [threading.Thread(target=writer.run, args=(stop, 3600.0), daemon=True),
                   threading.Thread(target=checkpointer.run, args=(stop, 0.01), daemon=True)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)  # the writer found nothing to anchor and is in its idle wait
            _fill(journal, 5)
            _wait(lambda: _all_confirmed(journal, 5), timeout=30, what="the woken writer's anchor")
            _fill(journal, 3, start=5)
            _wait(lambda: _all_confirmed(journal, 8), timeout=30, what="a second wake-up")
        finally:
            stop.set()
            writer.wake.set()
            for thread in threads:
                thread.join(30)
        assert not any(thread.is_alive() for thread in threads)  # stop ends the idle wait too
    journal.close()
