"""End-to-end benchmark: signed readings from M agent processes to confirmed on-chain records.

edgeledger: M publisher processes (coordinator.simagent: EC P-256 signed Celery tasks,
QoS 1 over mutual-TLS MQTT) -> `edge-coordinator run` (managed Mosquitto + anvil,
signature/chain/replay checks, readings + execution record in one SQLite transaction,
chain writer batching `recordBatch`) -> confirmed on chain. Latency: reading sampled_at
-> journal row confirmed (anchored_at), and sampled_at -> journaled.

Peer, same run, same machine: plain Celery over Redis doing the same ingestion (store
the reading with sqlite-utils, WAL + synchronous=FULL, acks_late, solo pool, prefetch 1)
without signing, TLS or ledger. Latency: sampled_at -> stored.

    .venv/bin/python bench/e2e.py [--agents 3] [--per-agent 1000]
    .venv/bin/python bench/e2e.py --only flood      # edgeledger flood throughput alone
    .venv/bin/python bench/e2e.py --only receipts   # receipt latency alone
    .venv/bin/python bench/e2e.py --only flood --coordinators 2   # two ingest coordinators sharing the queue
    .venv/bin/python bench/e2e.py --only paced --paced-rate 400    # latency at 400 readings/s offered

Receipt latency (phase 5): one real `edge-agent run` sampling every 0.2 s against a
fresh coordinator; per reading, its `sampled_at` -> the agent verified the signed
receipt covering it (the agent's "receipt verified ... at T" log line). Bounded below
by the coordinator's receipt batching (worker.receipt_interval, default 6 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import (  # first: puts the repository root on sys.path
    ANVIL_DEV_KEYS,
    ROOT,
    ProcessMeter,
    journal_query,
    start_coordinator,
    start_peer,
    start_redis,
)

from ledger.processes import ChildProcess

PY = sys.executable


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def progress(label: str, done: int, total: int, started: float) -> None:
    rate = done / max(1e-9, time.monotonic() - started)
    print(f"  {label}: {done}/{total} ({rate:,.0f}/s)", flush=True)


def wait_for(pred, timeout: float, what: str, label: str, total: int, started: float, count) -> None:
    deadline = time.monotonic() + timeout
    last = 0.0
    while time.monotonic() < deadline:
        if pred():
            return
        if time.monotonic() - last >= 2:
            progress(label, count(), total, started)
            last = time.monotonic()
        time.sleep(0.1)
    raise SystemExit(f"bench: timed out waiting for {what}")


query = journal_query


def sampled(meter: ProcessMeter, count, every: float = 0.5):
    """`count`, sampling the meter at most every `every` s on the way (CPU per role)."""
    last = [0.0]

    def wrapped() -> int:
        if time.monotonic() - last[0] >= every:
            meter.sample()
            last[0] = time.monotonic()
        return count()
    return wrapped


def cpu_per_reading(meter: ProcessMeter, readings: int) -> dict[str, float]:
    """CPU milliseconds per reading, by role, over the measured phase."""
    meter.sample()
    return {role: 1e3 * seconds / max(1, readings) for role, seconds in sorted(meter.cpu_total.items())}


# -- edgeledger ----------------------------------------------------------------------
def run_edgeledger(base: Path, agents: int, per_agent: int, interval: float = 0.0, coordinators: int = 1) -> dict:
    data = base / f"coord-{interval:g}"
    names = [f"bench-{i}" for i in range(agents)]
    daemon, _ = start_coordinator(data, base / "coordinator.log", names)
    peers: list[ChildProcess] = []
    pubs: list[ChildProcess] = []
    try:
        dirs = [data]
        for i in range(1, coordinators):  # peers: same broker and chain, own journal and recorder account
            dirs.append(base / f"peer-{i}-{interval:g}")
            peers.append(start_peer(data, dirs[-1], f"coordinator-{i}", ANVIL_DEV_KEYS[i - 1],
                                    base / f"peer-{i}.log"))
        total = agents * per_agent
        started = time.monotonic()
        meter = ProcessMeter(daemon.pid, {p.pid: "coordinator" for p in peers if p.pid})
        meter.sample()
        pubs = [ChildProcess(f"simagent {n}", [PY, "-m", "coordinator.simagent", "--bundle", str(data / "bundles" / n),
                                               "--count", str(per_agent), "--interval", str(interval)], cwd=ROOT).start()
                for n in names]
        meter.others.update({p.pid: "publishers" for p in pubs if p.pid})

        def count_confirmed() -> int:
            return sum((query(d / "journal.db", "SELECT COUNT(*) FROM executions WHERE anchor_state = 'confirmed'")
                        or [(0,)])[0][0] for d in dirs)

        confirmed = sampled(meter, count_confirmed)

        wait_for(lambda: confirmed() >= total, 170, "on-chain confirmation", "edgeledger confirmed", total, started, confirmed)
        elapsed = time.monotonic() - started
        cpu = cpu_per_reading(meter, total)
        for p in pubs:
            p.wait_until(lambda p=p: not p.alive(), 30, "exit")
        rows, transactions, shares = [], 0, []
        for d in dirs:
            got = query(d / "journal.db", "SELECT r.sampled_at, e.appended_at, e.anchored_at FROM readings r "
                                          "JOIN executions e ON e.task_id = r.task_id")
            rows += got
            shares.append(len(got))
            transactions += (query(d / "journal.db", "SELECT COUNT(DISTINCT tx_hash) FROM executions") or [(0,)])[0][0]
        return {
            "readings": len(rows), "seconds": elapsed, "rate": len(rows) / elapsed, "shares": shares,
            "journal_p50": pct([b - a for a, b, _ in rows], 0.5), "journal_p99": pct([b - a for a, b, _ in rows], 0.99),
            "chain_p50": pct([c - a for a, _, c in rows], 0.5), "chain_p99": pct([c - a for a, _, c in rows], 0.99),
            "transactions": transactions, "cpu": cpu,
        }
    finally:
        for p in pubs:
            p.kill()
        for peer in peers:
            peer.stop(timeout=60)
        daemon.stop(timeout=60)


# -- receipts: sample -> receipt verified on a real agent ------------------------------------
def run_receipts(base: Path, count: int, interval: float) -> dict:
    data, home = base / "coord-receipts", base / "agent-receipts"
    daemon, _ = start_coordinator(data, base / "coordinator-receipts.log", ["bench-r"])
    agent: ChildProcess | None = None
    log_path = base / "agent-receipts.log"
    try:
        subprocess.run([PY, "-m", "agent", "--data-dir", str(home), "enroll", "--bundle", str(data / "bundles" / "bench-r")],
                       check=True, capture_output=True, cwd=ROOT)
        agent = ChildProcess("edge-agent run", [PY, "-m", "agent", "--data-dir", str(home), "run", "--interval", str(interval),
                                                "--log-level", "INFO"], log_path, cwd=ROOT,
                             env={**os.environ, "EDGE_AGENT_HEARTBEAT_INTERVAL": "0"}).start()
        started = time.monotonic()
        journal = data / "journal.db"

        def receipts() -> list[tuple[int, float]]:
            out = []
            for line in log_path.read_text(errors="replace").splitlines():
                if "receipt verified: upto " in line:
                    upto = int(line.split("upto ")[1].split(",")[0])
                    out.append((upto, float(line.rsplit(" at ", 1)[1])))
            return out

        def confirmed() -> int:
            got = receipts()
            return max((u for u, _ in got), default=0)

        wait_for(lambda: confirmed() >= count, 170 + count * interval, "receipts", "receipts confirmed", count,
                 started, confirmed)
        got = receipts()
        sampled = dict(query(journal, "SELECT seq, sampled_at FROM readings WHERE agent_id = 'bench-r'"))
        lat = []
        for seq in range(1, count + 1):
            at = min(t for u, t in got if u >= seq)
            lat.append(at - sampled[seq])
        return {"readings": count, "receipts": len([g for g in got if g[0] <= count + 50]),
                "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "seconds": time.monotonic() - started}
    finally:
        for proc in (agent, daemon):
            if proc is not None:
                proc.stop(timeout=60)


# -- peer: plain Celery over Redis ---------------------------------------------------------
def redis_app(url: str):
    from celery import Celery

    app = Celery("peer", broker=url, set_as_current=False)
    app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, task_ignore_result=True,
                    worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)
    return app


def redis_worker(url: str, db_path: str) -> None:
    import sqlite_utils

    app = redis_app(url)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    db = sqlite_utils.Database(conn)
    db["readings"].create({"task_id": str, "agent_id": str, "sensor": str, "seq": int, "value": float, "unit": str,
                           "sampled_at": float, "stored_at": float}, pk="task_id", if_not_exists=True)

    @app.task(name="edge.ingest", bind=True)
    def ingest(self, reading):
        with db.conn:
            db.conn.execute("BEGIN IMMEDIATE")
            db["readings"].insert({**reading, "task_id": self.request.id, "stored_at": time.time()}, ignore=True)

    app.worker_main(["worker", "-P", "solo", "-Q", "edge.ingest", "-l", "WARNING", "--without-heartbeat",
                     "--without-mingle", "--without-gossip"])


def redis_publisher(url: str, agent: str, count: int, interval: float) -> None:
    app = redis_app(url)
    for seq in range(1, count + 1):
        if interval:
            time.sleep(interval)
        app.send_task("edge.ingest", kwargs={"reading": {"agent_id": agent, "sensor": "temp", "seq": seq, "value": 21.5,
                                                         "unit": "C", "sampled_at": time.time()}}, queue="edge.ingest")


def run_redis(base: Path, agents: int, per_agent: int, interval: float = 0.0) -> dict:
    redis, url = start_redis()
    db = base / f"peer-{interval:g}.db"
    worker: ChildProcess | None = None
    pubs: list[ChildProcess] = []
    try:
        worker = ChildProcess("celery+redis peer worker", [PY, __file__, "--redis-worker", url, str(db)], cwd=ROOT).start()
        while not query(db, "SELECT 1 FROM readings LIMIT 0") and not db.exists():
            time.sleep(0.1)
        time.sleep(2.0)  # let the worker subscribe
        total = agents * per_agent
        started = time.monotonic()
        meter = ProcessMeter(None, {pid: role for pid, role in ((redis.pid, "broker"), (worker.pid, "worker")) if pid})
        meter.sample()
        pubs = [ChildProcess(f"redis publisher {i}", [PY, __file__, "--redis-publisher", url, f"peer-{i}", str(per_agent),
                                                      str(interval)], cwd=ROOT).start() for i in range(agents)]
        meter.others.update({p.pid: "publishers" for p in pubs if p.pid})

        def count_stored() -> int:
            rows = query(db, "SELECT COUNT(*) FROM readings")
            return rows[0][0] if rows else 0

        stored = sampled(meter, count_stored)

        wait_for(lambda: stored() >= total, 170, "peer storage", "celery+redis stored", total, started, stored)
        elapsed = time.monotonic() - started
        cpu = cpu_per_reading(meter, total)
        rows = query(db, "SELECT sampled_at, stored_at FROM readings")
        return {"readings": len(rows), "seconds": elapsed, "rate": len(rows) / elapsed, "cpu": cpu,
                "p50": pct([b - a for a, b in rows], 0.5), "p99": pct([b - a for a, b in rows], 0.99)}
    finally:
        for p in pubs:
            p.kill()
        if worker is not None:
            worker.stop(timeout=20)
        redis.stop()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--redis-worker":
        redis_worker(sys.argv[2], sys.argv[3])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--redis-publisher":
        redis_publisher(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=3, help="publisher processes (default 3)")
    p.add_argument("--per-agent", type=int, default=1000, help="readings per publisher (default 1000)")
    p.add_argument("--only", choices=("flood", "paced", "receipts"), help="run one phase alone")
    p.add_argument("--coordinators", type=int, default=1, choices=range(1, len(ANVIL_DEV_KEYS) + 2),
                   metavar="N", help="edgeledger ingest coordinators sharing the queue (default 1; peers via "
                                     "`edge-coordinator peer`)")
    p.add_argument("--receipt-readings", type=int, default=100, help="readings for the receipt latency (default 100)")
    p.add_argument("--paced-rate", type=float, default=60.0,
                   help="readings/s offered in the paced phase, all publishers together (default 60)")
    p.add_argument("--paced-seconds", type=float, default=7.5, help="length of the paced phase (default 7.5)")
    args = p.parse_args()
    if args.paced_rate <= 0 or args.paced_seconds <= 0:
        p.error("--paced-rate and --paced-seconds must be positive")
    base = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    paced_gap = args.agents / args.paced_rate  # each publisher's gap between readings
    paced_n = max(1, round(args.paced_seconds / paced_gap))
    receipt_gap = 0.2
    if args.only:
        try:
            if args.only == "flood":
                o = run_edgeledger(base, args.agents, args.per_agent, coordinators=args.coordinators)
                print(f"flood: {o['readings']} readings journaled+anchored in {o['seconds']:.1f}s = {o['rate']:.0f}/s "
                      f"by {args.coordinators} coordinator(s) (journals {'+'.join(map(str, o['shares']))}); "
                      f"sample -> journaled p50 {o['journal_p50']*1e3:.0f} ms, p99 {o['journal_p99']*1e3:.0f} ms; "
                      f"-> on chain p50 {o['chain_p50']*1e3:.0f} ms, p99 {o['chain_p99']*1e3:.0f} ms; "
                      f"CPU ms per reading: {fmt_cpu(o['cpu'])}")
            elif args.only == "paced":
                o = run_edgeledger(base, args.agents, paced_n, paced_gap, coordinators=args.coordinators)
                print(f"paced: {o['readings']} readings offered at {args.paced_rate:g}/s ({args.agents} x one every "
                      f"{paced_gap * 1e3:.1f} ms), journaled+anchored at {o['rate']:.0f}/s; "
                      f"sample -> journaled p50 {o['journal_p50']*1e3:.1f} ms, p99 {o['journal_p99']*1e3:.1f} ms; "
                      f"-> on chain p50 {o['chain_p50']*1e3:.0f} ms, p99 {o['chain_p99']*1e3:.0f} ms; "
                      f"CPU ms per reading: {fmt_cpu(o['cpu'])}")
            else:
                print_receipts(run_receipts(base, args.receipt_readings, receipt_gap), receipt_gap)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return 0
    try:
        print(f"[1/4] edgeledger, flood: {args.agents} signed publishers x {args.per_agent} readings -> TLS MQTT -> coordinator -> anvil", flush=True)
        ours = run_edgeledger(base, args.agents, args.per_agent, coordinators=args.coordinators)
        print(f"[2/4] peer, flood: {args.agents} publishers x {args.per_agent} -> Celery over Redis -> SQLite (no signing/TLS/ledger)", flush=True)
        peer = run_redis(base, args.agents, args.per_agent)
        print(f"[3/4] edgeledger, paced: {args.agents} x {paced_n} readings, one every {paced_gap:g}s per publisher", flush=True)
        ours_paced = run_edgeledger(base, args.agents, paced_n, paced_gap, coordinators=args.coordinators)
        print(f"[4/4] peer, paced: {args.agents} x {paced_n} readings, one every {paced_gap:g}s per publisher", flush=True)
        peer_paced = run_redis(base, args.agents, paced_n, paced_gap)
        print(f"[5/5] receipts: one edge-agent run x {args.receipt_readings} readings, one every {receipt_gap:g}s", flush=True)
        receipts = run_receipts(base, args.receipt_readings, receipt_gap)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for title, o, r in (("flood (throughput; latency includes queueing)", ours, peer),
                        (f"paced ({args.agents / paced_gap:.0f} readings/s offered; pipeline latency)", ours_paced, peer_paced)):
        print()
        print(title)
        print(f"  {'':34} {'readings':>8} {'seconds':>8} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        print(f"  {'edgeledger sample -> journaled':34} {o['readings']:>8} {'':>8} {'':>8} {o['journal_p50']*1e3:>8.1f} {o['journal_p99']*1e3:>8.1f}")
        print(f"  {'edgeledger sample -> on chain':34} {o['readings']:>8} {o['seconds']:>8.1f} {o['rate']:>8.0f} {o['chain_p50']*1e3:>8.1f} {o['chain_p99']*1e3:>8.1f}")
        print(f"  {'celery+redis sample -> stored':34} {r['readings']:>8} {r['seconds']:>8.1f} {r['rate']:>8.0f} {r['p50']*1e3:>8.1f} {r['p99']*1e3:>8.1f}")
        print(f"  ratios edgeledger/peer: throughput {o['rate'] / r['rate']:.2f}x, p50 on-chain/stored {o['chain_p50'] / r['p50']:.1f}x, "
              f"p50 journaled/stored {o['journal_p50'] / r['p50']:.1f}x")
        print(f"  chain: {o['transactions']} transactions for {o['readings']} records ({o['readings'] / max(1, o['transactions']):.0f} per recordBatch)")
        print(f"  CPU ms per reading, edgeledger: {fmt_cpu(o['cpu'])}")
        print(f"  CPU ms per reading, celery+redis: {fmt_cpu(r['cpu'])}")
    print()
    print_receipts(receipts, receipt_gap)
    return 0


def fmt_cpu(cpu: dict[str, float]) -> str:
    return ", ".join(f"{role} {ms:.2f}" for role, ms in cpu.items()) + f"; total {sum(cpu.values()):.2f}"


def print_receipts(r: dict, gap: float) -> None:
    print(f"receipts ({1 / gap:.0f} readings/s from one real agent): sample -> signed receipt verified on the agent")
    print(f"  readings {r['readings']}, receipts {r['receipts']} ({r['readings'] / max(1, r['receipts']):.0f} readings per receipt), "
          f"p50 {r['p50']*1e3:.0f} ms, p99 {r['p99']*1e3:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
