"""Ledger benchmark: per-record anchoring (legacy `recordBatch`) side by side with the
transparency-log design (signed checkpoints anchored on chain), on anvil.

Measures, for each design: records/s anchored and gas per record; for the log: journal
append rate (record + tree nodes in one transaction), anchoring while appending at a
target rate (does it keep up? lag p50/p99), proof sizes at 10^6 records, and audit
rates: `edge-audit verify` (journal + chain) and `edge-audit verify --bundle` (one
inclusion proof verified per record, offline).

Run: .venv/bin/python bench/ledger.py [--records 100000] [--legacy 20000] [--rate 20000 --seconds 5]
Bounded: each phase has a record count; total a few minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eth_account import Account

from ledger import contract
from ledger.anvil import ManagedAnvil
from ledger.checkpointer import Checkpointer
from ledger.deploy import connect, fee_params
from ledger.journal import CONFIRMED, Journal
from ledger.record import ExecutionRecord
from ledger.rpc import send_raw, wait_receipt
from ledger.tlog.checkpoint import Checkpoint, sign_checkpoint
from ledger.tlog.merkle import MemoryNodeStore, MerkleLog, inclusion_proof_length
from ledger.tlog.note import Ed25519Signer
from ledger.tlog.proof import ProofBundle
from ledger.writer import ChainWriter


def make_record(i: int) -> ExecutionRecord:
    now = time.time()
    h = hashlib.sha256(str(i).encode()).hexdigest()
    return ExecutionRecord(task_id=str(uuid.uuid4()), task_name="edge.ingest", agent_id=f"agent-{i % 50}",
                           signer_fingerprint=h, args_digest=h, result_digest=h, status="SUCCESS",
                           received_at=now, started_at=now, finished_at=now, envelope_digest=h)


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# -- legacy: one on-chain event and storage slot per record --------------------------------------------
def _deploy_legacy(w3, key: str) -> str:
    art = contract.legacy_artifact()
    account = Account.from_key(key)
    data = bytes.fromhex(art["bytecode"][2:])
    tx = {"data": data, "nonce": w3.eth.get_transaction_count(account.address, "pending"), "chainId": w3.eth.chain_id,
          "value": 0, "gas": 3_000_000, "type": 2, **fee_params(w3)}
    h = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    return w3.eth.wait_for_transaction_receipt(h, timeout=60)["contractAddress"]


def bench_legacy(anvil: ManagedAnvil, n: int, batch: int) -> tuple[float, float]:
    """The old per-record path: `recordBatch` of `batch` records per tx, 4 txs in flight."""
    w3 = connect(anvil.rpc_url)
    key = anvil.dev_key
    address = _deploy_legacy(w3, key)
    account = Account.from_key(key)
    nonce = w3.eth.get_transaction_count(account.address, "pending")
    fees, chain_id = fee_params(w3), w3.eth.chain_id
    records = [make_record(i) for i in range(n)]
    gas_used = 0
    start = time.perf_counter()
    pending: list[bytes] = []
    for i in range(0, n, batch):
        chunk = records[i:i + batch]
        data = contract.encode_record_batch([r.task_key for r in chunk], [r.agent_key for r in chunk],
                                            [r.digest() for r in chunk], [r.status_code for r in chunk],
                                            [r.finished_at_ms for r in chunk])
        tx = {"to": address, "data": data, "value": 0, "chainId": chain_id, "nonce": nonce,
              "gas": 60_000 + 40_000 * len(chunk), "type": 2, **fees}
        pending.append(send_raw(w3, account.sign_transaction(tx).raw_transaction))
        nonce += 1
        if len(pending) >= 4:
            gas_used += sum(contract.as_int(wait_receipt(w3, "0x" + h.hex(), 60)["gasUsed"]) for h in pending)
            pending.clear()
    gas_used += sum(contract.as_int(wait_receipt(w3, "0x" + h.hex(), 60)["gasUsed"]) for h in pending)
    elapsed = time.perf_counter() - start
    return n / elapsed, gas_used / n


# -- transparency log ------------------------------------------------------------------------------------
def fill(journal: Journal, cp: Checkpointer, n: int, per_tx: int = 1000) -> float:
    """Append n records (record + leaf + nodes per append, `per_tx` appends per commit) with the
    checkpointer attached as in the daemon (a signed checkpoint every `cp.every` records); appends/s."""
    cp.attach()
    start = time.perf_counter()
    for first in range(0, n, per_tx):
        with journal.transaction() as db:
            for i in range(first, min(n, first + per_tx)):
                journal.append(make_record(i), db=db)
    cp.checkpoint()
    return n / (time.perf_counter() - start)


def bench_anchor(anvil: ManagedAnvil, workdir: Path, n: int, every: int, batch: int) -> dict[str, float]:
    journal = Journal(workdir / "tlog.db")
    cp = Checkpointer(journal, Ed25519Signer.generate("edgeledger/bench/coordinator"), every=every)
    journal.set_config(log_vkey=cp.signer.verifier().vkey)
    append_rate = fill(journal, cp, n)
    writer = ChainWriter(journal, anvil.rpc_url, anvil.dev_key, max_batch=batch)
    assert writer.contract_address
    checkpoints = journal.checkpoint_counts()["pending"]
    start = time.perf_counter()
    covered = writer.anchor_pending()
    elapsed = time.perf_counter() - start
    assert covered == n and journal.counts()[CONFIRMED] == n
    gas = 0
    for tx_hash in {c["tx_hash"] for c in journal.checkpoints()}:
        gas += contract.as_int(writer.w3.eth.get_transaction_receipt(tx_hash)["gasUsed"])
    journal.close()
    return {"append": append_rate, "anchor": n / elapsed, "gas": gas / n, "checkpoints": checkpoints,
            "txs": writer.stats.batches}


def bench_keeps_up(anvil: ManagedAnvil, workdir: Path, rate: int, seconds: float, every: int) -> dict[str, float]:
    """Append at `rate` records/s with the checkpointer (1 s / `every`) and the writer running, as in the daemon."""
    journal = Journal(workdir / "live.db")
    cp = Checkpointer(journal, Ed25519Signer.generate("edgeledger/bench/live"), interval=1.0, every=every).attach()
    writer = ChainWriter(journal, anvil.rpc_url, anvil.dev_key, max_batch=100)
    assert writer.contract_address
    stop = threading.Event()
    threads = [threading.Thread(target=writer.run, args=(stop, 0.01), daemon=True),
               threading.Thread(target=cp.run, args=(stop, 0.01), daemon=True)]
    for t in threads:
        t.start()
    appended = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        due = int((time.perf_counter() - start) * rate) - appended
        if due > 0:
            with journal.transaction() as db:
                for i in range(due):
                    journal.append(make_record(appended + i), db=db)
            appended += due
        time.sleep(0.005)
    achieved = appended / (time.perf_counter() - start)
    deadline = time.monotonic() + 120
    while journal.counts()[CONFIRMED] < appended and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    lat = sorted((r["anchored_at"] - r["appended_at"]) for r in journal.find(anchor_state=CONFIRMED))
    journal.close()
    return {"rate": achieved, "appended": appended, "confirmed": len(lat), "p50": statistics.median(lat),
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def proof_sizes(n: int = 10**6) -> tuple[int, int, int]:
    """(hashes, raw bytes, tlog-proof text bytes incl. the signed checkpoint) of the longest proof at n leaves."""
    log = MerkleLog(MemoryNodeStore())
    log.extend_leaf_hashes(hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n))
    worst = max(range(n - 64, n), key=lambda i: inclusion_proof_length(i, n))
    worst = max((0, worst), key=lambda i: inclusion_proof_length(i, n))
    proof = log.inclusion_proof(worst, n)
    signer = Ed25519Signer.generate("edgeledger/0123456789abcdef/coordinator")
    note = sign_checkpoint(Checkpoint(signer.name, n, log.root()), signer)
    text = ProofBundle(worst, tuple(proof), note).format()
    return len(proof), 32 * len(proof), len(text.encode())


def bench_verify(workdir: Path, anvil: ManagedAnvil) -> tuple[float, float, float]:
    """`edge-audit verify` (journal + chain), bundle export, `verify --bundle` (a proof per record)."""
    from ledger.audit_cli import main as audit_main

    path = workdir / "tlog.db"
    journal = Journal(path)
    rows = journal.counts()[CONFIRMED]
    journal.close()
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = audit_main(["--journal", str(path), "verify", "--quiet", "--no-pins", "--require-anchored"])
    verify = rows / (time.perf_counter() - start)
    assert code == 0, out.getvalue()[-2000:]
    bundle = workdir / "bundle.json"
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        assert audit_main(["--journal", str(path), "export", "--bundle", "-o", str(bundle)]) == 0
    export = rows / (time.perf_counter() - start)
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = audit_main(["verify", "--bundle", str(bundle), "--no-pins", "--no-signatures"])
    offline = rows / (time.perf_counter() - start)
    assert code == 0, out.getvalue()[-2000:]
    return verify, export, offline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="records for the log runs")
    parser.add_argument("--legacy", type=int, default=20_000, help="records for the per-record recordBatch run")
    parser.add_argument("--every", type=int, default=256, help="records per checkpoint (coordinator default 256)")
    parser.add_argument("--rate", type=int, default=20_000, help="append rate for the keep-up run (records/s)")
    parser.add_argument("--seconds", type=float, default=5.0, help="keep-up run duration")
    args = parser.parse_args()
    print(f"ledger bench: anvil, {os.cpu_count()} cores, journal SQLite WAL synchronous=FULL")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def chain(name: str) -> ManagedAnvil:  # a fresh chain per phase: same starting state for each
            return ManagedAnvil(work / name, accounts=1)

        with chain("legacy") as anvil:
            legacy, legacy_gas = bench_legacy(anvil, args.legacy, 100)
        print(f"legacy recordBatch x100 (per-record events): {legacy:9.0f} records/s  {legacy_gas:8.0f} gas/record "
              f"({args.legacy} records)")
        with chain("tlog") as anvil:
            r = bench_anchor(anvil, work, args.records, args.every, 100)
            print(f"log: journal append (record + leaf + nodes):  {r['append']:9.0f} records/s  "
                  f"({args.records} records, 1000 per commit)")
            print(f"log: anchoring checkpoints (every {args.every}):     {r['anchor']:9.0f} records/s  "
                  f"{r['gas']:8.1f} gas/record ({r['checkpoints']:.0f} checkpoints in {r['txs']:.0f} txs)")
            print(f"gas/record: legacy {legacy_gas:.0f} -> log {r['gas']:.1f} ({legacy_gas / r['gas']:.0f}x less); "
                  f"anchoring target >= 20,000 records/s: {'met' if r['anchor'] >= 20_000 else 'NOT met'}")
            verify, export, offline = bench_verify(work, anvil)
        print(f"edge-audit verify (journal + chain):        {verify:9.0f} records/s  "
              f"({'met' if verify >= 20_000 else 'NOT met'}: target >= 20,000)")
        print(f"edge-audit export --bundle:                 {export:9.0f} records/s  (one inclusion proof each)")
        print(f"edge-audit verify --bundle (offline):       {offline:9.0f} records/s  (one inclusion proof verified each)")
        hashes, raw, text = proof_sizes()
        print(f"inclusion proof at 10^6 records: {hashes} hashes = {raw} B raw "
              f"({'<=' if raw <= 1024 else '>'} 1 KB); tlog-proof text with the signed checkpoint {text} B")
        with chain("live") as anvil:
            k = bench_keeps_up(anvil, work, args.rate, args.seconds, args.every)
        print(f"keep-up: appended at {k['rate']:.0f}/s for {args.seconds:g} s ({k['appended']} records), "
              f"{k['confirmed']} covered on chain; append->anchored p50 {k['p50'] * 1000:.0f} ms, "
              f"p99 {k['p99'] * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
