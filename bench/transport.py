"""Celery over kombu_mqtt (plain and TLS) vs Celery over Redis, side by side in one run.

Each peer: a real `celery worker` subprocess (solo pool, concurrency 1, prefetch 1,
acks_late, rpc:// results, no heartbeat/gossip/mingle), the same N trivial tasks
published from this process and all results collected. Then the three workers sit
idle together and we count their voluntary context switches (/proc) as wakeups.

Run:  .venv/bin/python bench/transport.py [--tasks 5000] [--idle-seconds 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _harness import peer_env, peer_worker, start_redis
from _peer_app import make_app

import kombu_mqtt
from coordinator.broker import LoopbackBroker
from ledger.processes import ChildProcess
from security.pki import LoopbackPKI


def send_retrying(app, name: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return app.send_task(name)
        except kombu_mqtt.NoSubscribersError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run_peer(label: str, url: str, worker_ssl, client_ssl, tasks: int, workdir: Path) -> tuple[float, ChildProcess]:
    queue = f"bench.{label.replace(' ', '').replace('+', '')}"
    env = peer_env(url, worker_ssl, queue, client_id=f"bench-{label.replace(' ', '-').replace('+', '')}")
    worker = peer_worker(env, workdir / f"{queue}.log").start()
    worker.wait_for_log(" ready.", 60)
    app = make_app(url, client_ssl, queue)
    try:
        send_retrying(app, "peer.noop").get(timeout=60)  # warm-up: worker subscribed, result path open
        started = time.perf_counter()
        results = []
        for index in range(tasks):
            results.append(app.send_task("peer.noop"))
            if (index + 1) % 1000 == 0:
                print(f"  {label}: published {index + 1}/{tasks}", flush=True)
        for result in results:
            result.get(timeout=120)
        elapsed = time.perf_counter() - started
    finally:
        app.close()
    rate = tasks / elapsed
    print(f"  {label}: {tasks} tasks in {elapsed:.2f}s = {rate:,.0f} tasks/s", flush=True)
    return rate, worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-transport-"))
    pki = LoopbackPKI.create(workdir / "pki")
    broker = LoopbackBroker(workdir=workdir / "mosquitto", pki=pki).start()
    redis_proc, redis_url = start_redis(workdir)
    workers: dict[str, ChildProcess] = {}
    rates: dict[str, float] = {}
    try:
        peers = [
            ("Celery+Redis", redis_url, None, None),
            ("kombu_mqtt", broker.plain_url, None, None),
            ("kombu_mqtt+TLS", broker.tls_url, pki.ssl_options("bench-worker"), pki.ssl_options("bench-client")),
        ]
        for label, url, worker_ssl, client_ssl in peers:
            print(f"[{label}] {args.tasks} tasks, solo pool, concurrency 1, prefetch 1, acks_late, rpc:// results", flush=True)
            rates[label], workers[label] = run_peer(label, url, worker_ssl, client_ssl, args.tasks, workdir)

        print(f"[idle] all three workers idle for {args.idle_seconds:g}s, counting voluntary context switches", flush=True)
        time.sleep(2)
        before = {label: worker.context_switches() for label, worker in workers.items()}
        time.sleep(args.idle_seconds)
        idle = {label: (worker.context_switches() - before[label]) * 30.0 / args.idle_seconds
                for label, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.stop(timeout=20)
        broker.stop()
        redis_proc.stop()

    base = rates["Celery+Redis"]
    print("\nresults (tasks/s, higher is better; idle wakeups per 30 s, lower is better)")
    print(f"{'peer':<16}{'tasks/s':>10}{'vs Redis':>10}{'idle wakeups/30s':>20}")
    for label in rates:
        print(f"{label:<16}{rates[label]:>10,.0f}{rates[label] / base:>9.2f}x{idle[label]:>20.1f}")
    tls_ratio = rates["kombu_mqtt+TLS"] / base
    print(f"\ntarget MQTT+TLS >= 2x Celery+Redis: {'MET' if tls_ratio >= 2 else 'NOT MET'} ({tls_ratio:.2f}x)")
    print(f"target idle wakeups <= 5 per 30 s (MQTT+TLS): {'MET' if idle['kombu_mqtt+TLS'] <= 5 else 'NOT MET'} ({idle['kombu_mqtt+TLS']:.1f})")


if __name__ == "__main__":
    main()
