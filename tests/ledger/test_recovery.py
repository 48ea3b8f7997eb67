"""Crash recovery on a real anvil: SIGKILL mid-batch, restart from snapshot, chain wiped.

After each recovery `edge-audit verify` passes and every journal row is on chain
exactly once (the contract skips a taskId its recorder already recorded).
"""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from ledger.audit import fetch_events
from ledger.deploy import connect
from ledger.journal import CONFIRMED, PENDING, SENT, Journal
from ledger.record import id_key
from ledger.writer import ChainWriter
from tests.support.anvil import start_anvil

from .helpers import make_record

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


def _assert_exactly_once_and_verified(journal, path, rpc_url):
    config = journal.get_config()
    events = fetch_events(connect(rpc_url), config["contract_address"])
    rows = list(journal.rows())
    keys = {id_key(r["task_id"]) for r in rows}
    assert set(events) == keys, "chain and journal hold different task sets"
    assert all(len(events[k]) == 1 for k in keys), "a task was recorded twice"
    proc = subprocess.run([sys.executable, "-m", "ledger.audit_cli", "--journal", str(path), "verify", "--json",
                           "--require-anchored"], capture_output=True, text=True, cwd=REPO, timeout=120)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], report["findings"][:5]
    assert report["on_chain"] == len(rows)


def test_sigkill_mid_batch_restart_from_snapshot_then_wipe(tmp_path):
    path = tmp_path / "journal.db"
    journal = Journal(path)
    with start_anvil(tmp_path) as chain:
        _fill(journal, 4000)
        writer = ChainWriter(journal, chain.rpc_url, chain.dev_key, max_batch=20, in_flight=2, receipt_timeout=15)
        stop = threading.Event()
        thread = threading.Thread(target=writer.run, args=(stop, 0.05), daemon=True)
        thread.start()
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
            chain.snapshot()  # a reloaded chain with history still gives consistent snapshots

            chain.kill()
            for f in (tmp_path / "state").glob("*.json"):
                f.unlink()  # the chain is gone entirely
            chain.start()
            assert chain.loaded_from is None
            _fill(journal, 100, start=4300)
            _wait(lambda: _all_confirmed(journal, 4400), what="re-anchoring on a wiped chain")
            assert writer.stats.redeployed >= 1
            _assert_exactly_once_and_verified(journal, path, chain.rpc_url)
        finally:
            stop.set()
            thread.join(timeout=60)
            journal.close()
    assert not thread.is_alive()


def test_receipt_timeout_then_dropped_or_late_mined_tx(tmp_path):
    from ledger.anvil import rpc_call
    from ledger.writer import ChainWriterError

    import pytest

    journal = Journal(tmp_path / "journal.db")
    with start_anvil(tmp_path) as chain:
        writer = ChainWriter(journal, chain.rpc_url, chain.dev_key, max_batch=5, in_flight=1, receipt_timeout=1.0)
        assert writer.contract_address  # deploy while blocks are still mined
        _fill(journal, 5)
        rpc_call(chain.rpc_url, "evm_setAutomine", [False])
        try:
            with pytest.raises(ChainWriterError, match="no receipt"):
                writer.anchor_pending()
            assert journal.counts()[SENT] == 5
            rpc_call(chain.rpc_url, "anvil_dropAllTransactions")  # the tx is lost for good
        finally:
            rpc_call(chain.rpc_url, "evm_setAutomine", [True])
        assert writer.anchor_pending() == 5  # noticed the nonce gap, re-sent
        assert _all_confirmed(journal, 5)

        _fill(journal, 5, start=5)
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
