"""Mosquitto with a deep queue: what its autosave costs, and whether a backlog drains.

Why: a coordinator that is down or behind leaves tasks queued in its persistent broker
session. Mosquitto 2.0 keeps them in memory and rewrites its whole store to disk at each
`autosave_interval`, so the cost of a save grows with the queue. This bench queues N
messages of a given size for an offline persistent session (kombu_mqtt, QoS 1), then
reports, per autosave interval side by side in one run:

- the time to queue them and the broker's CPU seconds meanwhile;
- the broker's CPU over 10 s of idling with the queue full (saves only);
- the size of the store on disk;
- the time for one consumer (prefetch 1, acks each) to drain the whole queue, and the
  longest pause between two deliveries (a stall would show there).

    .venv/bin/python bench/broker_backlog.py                                # 60,000 x 3 KB; autosave 1, 10, 30 s
    .venv/bin/python bench/broker_backlog.py --messages 10000 --autosave 1 10  # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kombu import Connection, Consumer, Exchange, Producer, Queue  # noqa: E402

import kombu_mqtt  # noqa: E402,F401  (registers mqtt://)
from bench._harness import read_proc  # noqa: E402
from coordinator.broker import LoopbackBroker  # noqa: E402
from security.pki import LoopbackPKI  # noqa: E402

QUEUE = Queue("backlog", Exchange("", "direct"), routing_key="backlog")
SESSION = {"client_id": "backlog-consumer"}


def cpu_seconds(pid: int) -> float:
    info = read_proc(pid)
    if info is None:
        raise SystemExit(f"the broker (pid {pid}) is gone")
    return info[0]


def subscribe_then_leave(url: str) -> None:
    """Create the persistent session and its subscription, then go offline."""
    conn = Connection(url, transport_options=SESSION)
    with Consumer(conn, [QUEUE], callbacks=[lambda body, msg: msg.ack()], prefetch_count=1):
        try:
            conn.drain_events(timeout=0.3)
        except TimeoutError:
            pass
    conn.release()


def run(messages: int, size: int, autosave: int, work: Path, pki: LoopbackPKI) -> dict[str, float]:
    store = Path(tempfile.mkdtemp(prefix=f"store-{autosave}-", dir=work))
    broker = LoopbackBroker(Path(tempfile.mkdtemp(prefix="broker-", dir=work)), pki, extra_config=(
        f"max_queued_messages 0\npersistence true\npersistence_location {store}/\nautosave_interval {autosave}\n"))
    broker.start()
    assert broker.process is not None and broker.process.process is not None
    pid = broker.process.process.pid
    try:
        subscribe_then_leave(broker.plain_url)
        pad = "x" * size
        with Connection(broker.plain_url) as conn:
            producer = Producer(conn)
            start, cpu0 = time.monotonic(), cpu_seconds(pid)
            for i in range(messages):
                producer.publish({"i": i, "pad": pad}, exchange="", routing_key=QUEUE.routing_key, delivery_mode=1)
                if (i + 1) % 10_000 == 0:
                    print(f"  autosave {autosave}s: {i + 1} queued", file=sys.stderr, flush=True)
            queue_s, queue_cpu = time.monotonic() - start, cpu_seconds(pid) - cpu0
        cpu1 = cpu_seconds(pid)
        time.sleep(10)
        idle_cpu = cpu_seconds(pid) - cpu1
        db = store / "mosquitto.db"
        db_mb = db.stat().st_size / 1e6 if db.exists() else 0.0
        got, last, worst = 0, time.monotonic(), 0.0

        def on_message(body: object, msg: object) -> None:
            nonlocal got, last, worst
            now = time.monotonic()
            worst, last, got = max(worst, now - last), now, got + 1
            msg.ack()  # type: ignore[attr-defined]

        conn = Connection(broker.plain_url, transport_options=SESSION)
        start = last = time.monotonic()
        with Consumer(conn, [QUEUE], callbacks=[on_message], prefetch_count=1):
            while got < messages:
                try:
                    conn.drain_events(timeout=30)
                except TimeoutError:
                    raise SystemExit(f"autosave {autosave}s: nothing delivered for 30 s after {got} of {messages}") from None
        drain_s = time.monotonic() - start
        conn.release()
    finally:
        broker.stop()
    return {"queue_s": queue_s, "queue_cpu": queue_cpu, "idle_cpu": idle_cpu, "db_mb": db_mb,
            "drain_s": drain_s, "worst_gap": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--size", type=int, default=3000, help="payload padding in bytes (a signed task is ~3 KB)")
    parser.add_argument("--autosave", type=int, nargs="+", default=[1, 10, 30], help="autosave_interval values (s)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="broker-backlog-"))
    pki = LoopbackPKI.create(work / "pki")
    print(f"{args.messages} messages of ~{args.size} B queued for an offline persistent session, then drained "
          f"(load {os.getloadavg()[0]:.1f})")
    print("autosave | queue s | broker CPU s while queueing | broker CPU s per 10 s idle | store MB | drain s "
          "| drain msg/s | longest gap s")
    for autosave in args.autosave:
        r = run(args.messages, args.size, autosave, work, pki)
        print(f"{autosave:>7}s | {r['queue_s']:7.1f} | {r['queue_cpu']:27.1f} | {r['idle_cpu']:26.1f} | "
              f"{r['db_mb']:8.0f} | {r['drain_s']:7.1f} | {args.messages / r['drain_s']:11.0f} | {r['worst_gap']:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
