"""Two coordinators share the ingest queue; one is SIGKILLed mid-stream (issue #13).

Real processes: coordinator A (`edge-coordinator run`: managed Mosquitto with mutual TLS
and dynsec, anvil, its journal), coordinator B made by `edge-coordinator peer` (its own
certificate from the fleet CA, journal, log key and recorder account; A's broker and
chain by URL) and one `edge-agent run` that accepts receipts from both. B is SIGKILLed
while the agent streams and restarted on its data dir. The outcome, exactly: every
reading the agent stored is in exactly one of the two journals, the agent's outbox is
empty (each reading confirmed by the receipt of the coordinator that stored it),
`edge-audit fleet` passes on both journals, no task is anchored by both coordinators,
and each recorder account's nonce equals the transactions mined from it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.anvil import rpc_call
from tests.agent.support import Proc, kill_group
from tests.support.net import free_port

from .support import ROOT, CoordinatorProcess, cli, wait_until
from .test_receipts_e2e import enroll, outbox, run_agent, seqs

pytestmark = pytest.mark.slow

# anvil's second dev account (its first is A's recorder): B's own recorder account
PEER_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
AGENT_ENV = {"EDGE_AGENT_COMMAND_SIGNERS": "coordinator,coordinator-b", "EDGE_AGENT_WITNESS": "false",
             # longer than a killed coordinator's restart: it confirms what it stored before anyone re-sends
             "EDGE_AGENT_RESEND_AFTER": "60"}


@pytest.fixture
def peer(tmp_path: Path):
    proc = CoordinatorProcess(tmp_path / "b")
    yield proc
    proc.cleanup()


def fleet_audit(*dirs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGE_AUDIT_PINS": str(dirs[0].parent / "audit-pins.json")}
    return subprocess.run([sys.executable, "-m", "ledger.audit_cli", "--json", "fleet", *map(str, dirs),
                           "--require-anchored", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)


def unreceipted(home: Path, coordinator: CoordinatorProcess) -> set[int]:
    """Seqs the agent published and still holds that `coordinator` already journaled."""
    db = sqlite3.connect(f"file:{home / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        held = {r[0] for r in db.execute("SELECT seq FROM outbox WHERE task_name = 'edge.ingest' AND sent_at IS NOT NULL")}
    finally:
        db.close()
    return held & set(seqs(coordinator, "mc-1"))


def mined_per_sender(chain_url: str) -> dict[str, int]:
    top = int(rpc_call(chain_url, "eth_blockNumber"), 16)
    sent: dict[str, int] = {}
    for n in range(top + 1):
        for tx in rpc_call(chain_url, "eth_getBlockByNumber", [hex(n), True])["transactions"]:
            sent[tx["from"].lower()] = sent.get(tx["from"].lower(), 0) + 1
    return sent


def test_two_coordinators_one_killed_store_every_reading_exactly_once(
        coordinator: CoordinatorProcess, peer: CoordinatorProcess, tmp_path: Path, procs: list[Proc]) -> None:
    a = coordinator.init("mc-1").start()
    made = cli("peer", "coordinator-b", "--data-dir", str(a.data_dir), "--out", str(peer.data_dir),
               "--chain-key", PEER_KEY, "--http-port", str(peer.http_port))
    assert made.returncode == 0, made.stderr
    assert "broker rights updated" in made.stdout + made.stderr  # dynsec: B got the coordinator role live
    b = peer.start()
    home = enroll(a, "mc-1", tmp_path / "mc-1")
    procs.append(run_agent(home, "0.05", "run1.log", **AGENT_ENV))

    # the shared subscription hands readings to both
    wait_until(lambda: len(seqs(a, "mc-1")) >= 10 and len(seqs(b, "mc-1")) >= 10, 120, "both coordinators ingesting")
    wait_until(lambda: unreceipted(home, b), 60, "readings B journaled that wait for its receipt")
    b.kill()  # SIGKILL mid-stream: what it journaled but did not receipt yet, and what sits in its session
    window = unreceipted(home, b)
    assert window, "the kill must leave readings journaled by B and not yet receipted (else a re-send is harmless)"
    at_kill = len(seqs(a, "mc-1"))
    wait_until(lambda: len(seqs(a, "mc-1")) >= at_kill + 20, 120, "A ingesting alone")
    b.start()  # same data dir and MQTT session: queued readings come back to it; start-up receipts

    kill_group(procs.pop().proc)  # stop streaming; an idle agent drains what is left
    procs.append(run_agent(home, "3600", "drain.log", **AGENT_ENV))
    wait_until(lambda: outbox(home)[0] == 0, 120, "every reading confirmed by a receipt (outbox empty)")
    last = outbox(home)[1]
    in_a, in_b = seqs(a, "mc-1"), seqs(b, "mc-1")
    assert sorted(in_a + in_b) == list(range(1, last + 1))  # each reading in exactly one journal
    assert in_a and in_b and window <= set(in_b)  # B's un-receipted readings were stored by B alone

    ids_a = {r[0] for r in a.query("SELECT task_id FROM executions")}
    ids_b = {r[0] for r in b.query("SELECT task_id FROM executions")}
    assert ids_a.isdisjoint(ids_b)  # no task journaled (and so anchored) by both
    wait_until(lambda: a.all_confirmed() and b.all_confirmed(), 120, "every journal row anchored")
    result = fleet_audit(a.data_dir, b.data_dir)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"], result.stdout[-3000:] + result.stderr
    assert report["duplicates"] == [] and [j["rows"] for j in report["journals"]] == [len(ids_a), len(ids_b)]
    assert [(c["agent_id"], c["stored"], c["gaps"]) for c in report["completeness"]] == [("mc-1", last, [])]

    # one recorder account per coordinator, and no nonce collided: nonce == transactions mined from it
    chain = f"http://127.0.0.1:{a.chain_port}"
    sent = mined_per_sender(chain)
    recorders = [c.query("SELECT value FROM ledger_config WHERE key = 'recorder'")[0][0].lower() for c in (a, b)]
    assert recorders == [acct.lower() for acct in rpc_call(chain, "eth_accounts")[:2]]  # A: dev #0, B: dev #1
    for account in recorders:
        assert int(rpc_call(chain, "eth_getTransactionCount", [account, "latest"]), 16) == sent[account] > 0
    b.stop()
    a.stop()


def test_peer_needs_its_own_recorder_account(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    coordinator.init()
    out = cli("peer", "coordinator-b", "--data-dir", str(coordinator.data_dir), "--out", str(tmp_path / "b"),
              "--chain-key", "", "--http-port", str(free_port()))
    assert out.returncode == 1 and "--chain-key is required" in out.stderr
    out = cli("peer", "coordinator", "--data-dir", str(coordinator.data_dir), "--out", str(tmp_path / "b"),
              "--chain-key", PEER_KEY)
    assert out.returncode == 1 and "reserved identity" in out.stderr
