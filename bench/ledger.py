"""Ledger benchmark: records/s anchored on anvil, single `record` vs `recordBatch`,
and journal-to-confirmed latency (p50/p99) under a steady append rate.

Run: .venv/bin/python bench/ledger.py [--records 20000] [--single 1000] [--rate 2000 --seconds 5]
Bounded: each phase has a record count and a time cap; total well under 3 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eth_account import Account  # noqa: E402

from ledger import contract  # noqa: E402
from ledger.anvil import ManagedAnvil  # noqa: E402
from ledger.deploy import connect, deploy_contract, fee_params  # noqa: E402
from ledger.journal import CONFIRMED, Journal  # noqa: E402
from ledger.record import ExecutionRecord  # noqa: E402
from ledger.writer import ChainWriter, send_raw, wait_receipt  # noqa: E402


def make_record(i: int) -> ExecutionRecord:
    now = time.time()
    h = hashlib.sha256(str(i).encode()).hexdigest()
    return ExecutionRecord(task_id=str(uuid.uuid4()), task_name="edge.ingest", agent_id=f"agent-{i % 50}",
                           signer_fingerprint=h, args_digest=h, result_digest=h, status="SUCCESS",
                           received_at=now, started_at=now, finished_at=now, envelope_digest=h)


def fill(journal: Journal, n: int) -> None:
    with journal.transaction() as db:
        for i in range(n):
            journal.append(make_record(i), db=db)


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def bench_single(anvil: ManagedAnvil, workdir: Path, n: int, key: str) -> tuple[float, int]:
    """One `record` transaction per record, sent and confirmed one after another.

    Uses the writer's raw send/receipt helpers so only batching differs between the runs.
    """
    journal = Journal(workdir / "single.db")
    fill(journal, n)
    w3 = connect(anvil.rpc_url)
    address = deploy_contract(w3, key)
    account = Account.from_key(key)
    nonce = w3.eth.get_transaction_count(account.address, "pending")
    fees, chain_id = fee_params(w3), w3.eth.chain_id
    rows = journal.pending(n)
    start = time.perf_counter()
    for i, row in enumerate(rows):
        rec = ExecutionRecord.from_mapping(row)
        data = contract.encode_record(rec.task_key, rec.agent_key, bytes.fromhex(row["digest"]), rec.status_code,
                                      rec.finished_at_ms)
        tx = {"to": address, "data": data, "value": 0, "chainId": chain_id, "nonce": nonce, "gas": 80_000,
              "type": 2, **fees}
        tx_hash = send_raw(w3, account.sign_transaction(tx).raw_transaction)
        nonce += 1
        receipt = wait_receipt(w3, "0x" + tx_hash.hex(), timeout=30)
        journal.mark_confirmed([row["task_id"]], int(receipt["blockNumber"], 16), receipt["blockHash"])
        if i and i % 250 == 0:
            progress(f"single: {i}/{n}")
    elapsed = time.perf_counter() - start
    assert journal.counts()[CONFIRMED] == n
    journal.close()
    return n / elapsed, int(receipt["gasUsed"], 16)


def bench_batched(anvil: ManagedAnvil, workdir: Path, n: int, key: str, batch: int) -> tuple[float, int]:
    journal = Journal(workdir / f"batched-{batch}.db")
    fill(journal, n)
    writer = ChainWriter(journal, anvil.rpc_url, key, max_batch=batch)
    writer.anchor_pending(limit=batch)  # deploy + warm up (gas estimate) outside the timing
    start = time.perf_counter()
    done = 0
    while True:
        step = writer.anchor_pending(limit=max(batch * 20, n // 5))
        if not step:
            break
        done += step
        progress(f"batched x{batch}: {done + batch}/{n}")
    elapsed = time.perf_counter() - start
    assert journal.counts()[CONFIRMED] == n
    receipt_gas = _gas_per_record(writer, journal)
    journal.close()
    return done / elapsed, receipt_gas


def _gas_per_record(writer: ChainWriter, journal: Journal) -> int:
    row = next(journal.rows("anchor_state = ?", (CONFIRMED,), order="id DESC", limit=1))
    receipt = writer.w3.eth.get_transaction_receipt(row["tx_hash"])
    return receipt["gasUsed"] // max(1, len(receipt["logs"]))


def bench_verify(journal_path: Path) -> float:
    """`edge-audit verify` over the x100 journal (in-process main(), chain still up)."""
    import contextlib
    import io

    from ledger.audit_cli import main as audit_main

    rows = Journal(journal_path).counts()[CONFIRMED]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = audit_main(["--journal", str(journal_path), "verify", "--quiet"])
    elapsed = time.perf_counter() - start
    assert code == 0, "verify failed on the benchmark journal"
    return rows / elapsed


def bench_latency(anvil: ManagedAnvil, workdir: Path, rate: int, seconds: float, key: str) -> tuple[float, float, int]:
    """Append at `rate` records/s while the writer runs; latency = confirmed - appended."""
    journal = Journal(workdir / "latency.db")
    writer = ChainWriter(journal, anvil.rpc_url, key, max_batch=100)
    writer.anchor_pending()
    stop = threading.Event()
    thread = threading.Thread(target=writer.run, args=(stop, 0.005), daemon=True)
    thread.start()
    appended = 0
    start = time.perf_counter()
    tick = 0.01
    while time.perf_counter() - start < seconds:
        due = int((time.perf_counter() - start) * rate) - appended
        if due > 0:
            with journal.transaction() as db:
                for i in range(due):
                    journal.append(make_record(appended + i), db=db)
            appended += due
        time.sleep(tick)
    deadline = time.monotonic() + 60
    while journal.counts()[CONFIRMED] < appended and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=30)
    lat = sorted((r["anchored_at"] - r["appended_at"]) * 1000 for r in journal.rows("anchor_state = ?", (CONFIRMED,))
                 if r["anchored_at"] is not None)
    journal.close()
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return p50, p99, len(lat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000, help="records for the batched runs")
    parser.add_argument("--single", type=int, default=1_000, help="records for the single-`record` run")
    parser.add_argument("--rate", type=int, default=2_000, help="append rate for the latency run (records/s)")
    parser.add_argument("--seconds", type=float, default=5.0, help="latency run duration")
    args = parser.parse_args()
    print(f"ledger bench: anvil, {os.cpu_count()} cores, journal SQLite WAL synchronous=FULL")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def chain(name: str) -> ManagedAnvil:  # a fresh chain per phase: same starting state for each
            return ManagedAnvil(work / name, accounts=1)

        with chain("single") as anvil:
            single, g1 = bench_single(anvil, work, args.single, anvil.dev_key)
        print(f"single `record` per tx:   {single:8.0f} records/s  ({args.single} records, {g1} gas/record)")
        with chain("b10") as anvil:
            b10, g10 = bench_batched(anvil, work, args.records // 4, anvil.dev_key, 10)
        print(f"recordBatch x10:          {b10:8.0f} records/s  ({args.records // 4} records, {g10} gas/record)")
        with chain("b100") as anvil:
            b100, g100 = bench_batched(anvil, work, args.records, anvil.dev_key, 100)
            verify_rate = bench_verify(work / "batched-100.db")
        print(f"recordBatch x100:         {b100:8.0f} records/s  ({args.records} records, {g100} gas/record)"
              "  <- writer default")
        with chain("b200") as anvil:
            b200, g200 = bench_batched(anvil, work, args.records, anvil.dev_key, 200)
        print(f"recordBatch x200:         {b200:8.0f} records/s  ({args.records} records, {g200} gas/record)")
        print(f"ratio x100/single:        {b100 / single:8.1f}x   x200/x100: {b200 / b100:.2f}x   x10/single: "
              f"{b10 / single:.1f}x")
        print(f"target >= 4,000 records/s batched (x100): {'met' if b100 >= 4000 else 'NOT met'}")
        print(f"edge-audit verify:        {verify_rate:8.0f} rows/s     (digest recompute + chunked eth_getLogs)")
        with chain("latency") as anvil:
            p50, p99, n = bench_latency(anvil, work, args.rate, args.seconds, anvil.dev_key)
        print(f"journal->confirmed latency at {args.rate}/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({n} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
