"""The whole coordinator on loopback: real Mosquitto (mutual TLS), real anvil, real signing.

Agents are stand-in signed publishers (coordinator.simagent): the stream must be exact
(known seq numbers and counts) for the exactly-once assertions.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.support.prom import sample

from .support import CoordinatorProcess, audit, cli, simagent, verified_anchored, wait_until

pytestmark = pytest.mark.slow


def _finish(pub, timeout: float = 120) -> dict:
    out, err = pub.communicate(timeout=timeout)
    assert pub.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_full_flow_ingest_journal_chain_audit_revoke_and_clean_stop(coordinator: CoordinatorProcess) -> None:
    coordinator.init("e2e-a", "e2e-b").start()
    pubs = [simagent(coordinator.bundle(n), "--count", "60", "--heartbeat-every", "20") for n in ("e2e-a", "e2e-b")]
    for pub in pubs:
        assert _finish(pub)["sent"] == 60
    wait_until(lambda: coordinator.readings() == 120, 90, "120 readings stored")
    wait_until(coordinator.all_confirmed, 90, "every journal row confirmed on chain")
    assert coordinator.query("SELECT agent_id, COUNT(DISTINCT seq) FROM readings GROUP BY 1") == [("e2e-a", 60), ("e2e-b", 60)]

    # anchor latencies reach the histogram at the scrape after their confirmation
    metrics = wait_until(lambda: (text := coordinator.metrics()) and
                         (sample(text, "edgeledger_anchor_latency_seconds_count") or 0) >= 126 and text, 30,
                         "every anchored row observed in the anchor latency histogram")
    assert sample(metrics, "edgeledger_tasks_executed_total", task="edge.ingest") == 120
    assert sample(metrics, "edgeledger_tasks_executed_total", task="edge.heartbeat") == 6
    assert sample(metrics, "edgeledger_ledger_pending_rows", state="pending") == 0
    assert sample(metrics, "edgeledger_agent_last_seen_timestamp_seconds", agent="e2e-a") is not None
    assert sample(metrics, "edgeledger_anchor_latency_seconds_count") == 126

    listing = cli("agents", "--data-dir", str(coordinator.data_dir), "--json")
    agents = {a["agent_id"]: a for a in json.loads(listing.stdout)}
    assert agents["e2e-a"]["status"] == "online" and agents["e2e-a"]["readings"] == 60
    assert agents["e2e-b"]["outbox_backlog"] == 0 and agents["e2e-b"]["cert_not_after"] > time.time()

    report = verified_anchored(coordinator.data_dir)
    assert report["rows"] == 126 and report["signatures_ok"] == 126

    # a command to an agent nobody consumes for fails at once, in one line
    out = cli("send", "--data-dir", str(coordinator.data_dir), "e2e-a", "status", "--timeout", "5")
    assert out.returncode == 5 and "is not connected" in out.stderr  # security.exit_codes.NOT_DELIVERED and out.stderr.count("\n") == 1, out.stderr

    # revoke while e2e-b is connected and streaming. dynsec (the default) cuts its live
    # connection at once; the few tasks it published between the CRL write and the cut are
    # refused by the signature checks (cert_revoked); it learns it is refused and stops
    # (exit 78) instead of retrying forever; Mosquitto refuses new connections (CRL reload).
    # (Before dynsec was the default, this test asserted only the signature checks' refusals.)
    live = simagent(coordinator.bundle("e2e-b"), "--count", "0", "--duration", "60", "--interval", "0.05",
                    "--start-seq", "500", "--reconnect-timeout", "3")
    wait_until(lambda: coordinator.query("SELECT COUNT(*) FROM readings WHERE seq >= 500") >= [(5,)], 60,
               "e2e-b streaming before the revocation")
    out = cli("revoke", "--data-dir", str(coordinator.data_dir), "e2e-b")
    assert out.returncode == 0 and "told the running coordinator" in out.stdout, out.stdout + out.stderr
    assert "broker rights updated" in out.stdout, out.stdout
    out_b, err_b = live.communicate(timeout=120)
    assert live.returncode == 78, err_b[-2000:]
    summary = json.loads(out_b.strip().splitlines()[-1])
    assert summary["refused"] in ("certificate_revoked", "not_authorized") and "re-enroll" in err_b
    sent = summary["sent"]

    def refused_revoked() -> int:
        for line in coordinator.metrics().splitlines():
            if line.startswith('edgeledger_signing_refusals_total{reason="cert_revoked"}'):
                return int(float(line.split()[-1]))
        return 0

    def b_stored() -> int:
        return coordinator.query("SELECT COUNT(*) FROM readings WHERE agent_id = 'e2e-b'")[0][0]

    # every task the broker acknowledged is either stored or refused as cert_revoked
    wait_until(lambda: b_stored() + refused_revoked() == 60 + sent, 60, "e2e-b's acknowledged tasks all handled")
    pub = simagent(coordinator.bundle("e2e-b"), "--count", "1", "--start-seq", "1000", "--retries", "1",
                   "--reconnect-timeout", "3")
    pub.communicate(timeout=120)
    assert pub.returncode != 0  # the broker re-read the CRL (SIGHUP) and refuses the handshake
    listing = json.loads(cli("agents", "--data-dir", str(coordinator.data_dir), "--json").stdout)
    assert {a["agent_id"]: a["status"] for a in listing}["e2e-b"] == "revoked"

    mosquitto = coordinator.mosquitto_pid()
    assert coordinator.stop(signal.SIGTERM) == 0
    assert "edge-coordinator: stopped" in coordinator.log()
    # an orderly stop is recorded: the next `run` skips the journal's full scan (ledger.sqlite_files)
    from ledger.sqlite_files import clean_stop_marker

    assert clean_stop_marker(coordinator.data_dir / "journal.db").exists()
    assert mosquitto and not Path(f"/proc/{mosquitto}").exists()
    assert (coordinator.data_dir / "chain" / "anvil-state.json").exists()


def test_sigkill_during_stream_every_reading_stored_and_anchored_once(coordinator: CoordinatorProcess) -> None:
    coordinator.init("crash-a").start()
    pub = simagent(coordinator.bundle("crash-a"), "--count", "2000")
    wait_until(lambda: coordinator.readings() >= 300, 120, "300 readings before the crash")
    coordinator.kill()
    killed_at = coordinator.readings()
    assert killed_at < 2000, "the stream ended before the crash: nothing was tested"
    time.sleep(1.0)  # the publisher keeps going: the surviving broker queues for the coordinator's session
    coordinator.start()
    assert _finish(pub, timeout=180)["sent"] == 2000
    wait_until(lambda: coordinator.readings() >= 2000, 180, "2000 readings stored after the restart")
    wait_until(coordinator.all_confirmed, 120, "every row confirmed on chain")
    rows = coordinator.query("SELECT COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) FROM readings")
    assert rows == [(2000, 2000, 1, 2000)]
    execs = coordinator.query("SELECT COUNT(*), COUNT(DISTINCT task_id) FROM executions WHERE task_name = 'edge.ingest'")
    assert execs == [(2000, 2000)]
    verified = audit(coordinator.data_dir, "--json", "verify", "--require-anchored", "--quiet")
    report = json.loads(verified.stdout)
    assert report["ok"], verified.stdout
    # checkpoint anchoring (issue #12): every record in an anchored checkpoint, one on-chain
    # event per stored checkpoint, nothing anchored twice (events from our recorder only)
    assert report["on_chain"] == report["rows"] == 2000
    assert report["events"] == report["anchored_checkpoints"] == report["checkpoints"], report
    assert report["events"] < 2000 / 10  # per-record gas is gone: a checkpoint covers many records


def test_broker_restart_mid_stream_loses_nothing(coordinator: CoordinatorProcess) -> None:
    coordinator.init("bounce-a").start()
    pub = simagent(coordinator.bundle("bounce-a"), "--count", "600", "--interval", "0.01")
    wait_until(lambda: coordinator.readings() >= 150, 120, "150 readings before the broker restart")
    old = coordinator.mosquitto_pid()
    assert old is not None
    import os

    os.kill(old, signal.SIGTERM)  # the daemon's supervisor restarts it (persistence keeps queued tasks)
    wait_until(lambda: coordinator.mosquitto_pid() not in (None, old), 60, "mosquitto restarted by the supervisor")
    assert _finish(pub, timeout=180)["sent"] == 600
    wait_until(lambda: coordinator.readings() >= 600, 180, "600 readings after the broker restart")
    wait_until(coordinator.all_confirmed, 120, "every row confirmed on chain")
    assert coordinator.query("SELECT COUNT(*), COUNT(DISTINCT seq) FROM readings") == [(600, 600)]
    assert coordinator.healthy()


def test_sigterm_mid_stream_then_restart_loses_nothing(coordinator: CoordinatorProcess) -> None:
    """Clean stop (worker finishes its task, writer flushes, broker persists its queue) and back."""
    coordinator.init("term-a").start()
    pub = simagent(coordinator.bundle("term-a"), "--count", "1500")
    wait_until(lambda: coordinator.readings() >= 200, 120, "200 readings before the stop")
    assert coordinator.stop(signal.SIGTERM) == 0
    stopped_at = coordinator.readings()
    assert stopped_at < 1500, "the stream ended before the stop: nothing was tested"
    assert coordinator.all_confirmed(), coordinator.anchor_states()  # the writer flushed before exiting
    coordinator.start()  # the publisher was retrying the same task ids meanwhile
    assert _finish(pub, timeout=180)["sent"] == 1500
    wait_until(lambda: coordinator.readings() >= 1500, 180, "1500 readings after the restart")
    wait_until(coordinator.all_confirmed, 120, "every row confirmed on chain")
    assert coordinator.query("SELECT COUNT(*), COUNT(DISTINCT seq) FROM readings") == [(1500, 1500)]
    assert coordinator.query("SELECT COUNT(*) FROM executions WHERE task_name = 'edge.ingest'") == [(1500,)]
