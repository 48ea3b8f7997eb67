"""Celery over kombu_mqtt (plain and TLS) vs Celery over Redis, side by side in one run.

Each peer: a real `celery worker` subprocess (solo pool, concurrency 1, prefetch 1,
acks_late, rpc:// results, no heartbeat/gossip/mingle), the same N trivial tasks
published from this process and all results collected. Then the three workers sit
idle together and we count their voluntary context switches (/proc) as wakeups.

Run:  .venv/bin/python bench/transport.py [--tasks 5000] [--idle-seconds 30]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kombu_mqtt  # noqa: E402
from tests.support.mosquitto import FleetPKI, MosquittoBroker  # noqa: E402
from tests.support.net import free_port, wait_for_port  # noqa: E402
from tests.transport.celery_app import make_app  # noqa: E402
from tests.transport.worker_proc import WorkerProcess, worker_env  # noqa: E402


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("redis-server is not installed: apt-get install redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    wait_for_port(port)
    return proc, f"redis://127.0.0.1:{port}/0"


def send_retrying(app, name: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return app.send_task(name)
        except kombu_mqtt.NoSubscribersError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run_peer(label: str, url: str, worker_ssl, client_ssl, tasks: int, workdir: Path) -> tuple[float, WorkerProcess]:
    queue = f"bench.{label.replace(' ', '').replace('+', '')}"
    env = worker_env(url, worker_ssl, queue, client_id=f"bench-{label.replace(' ', '-').replace('+', '')}")
    worker = WorkerProcess(env, workdir / f"{queue}.log").start()
    worker.wait_ready()
    app = make_app(url, client_ssl, queue)
    try:
        send_retrying(app, "kmq.noop").get(timeout=60)  # warm-up: worker subscribed, result path open
        started = time.perf_counter()
        results = []
        for index in range(tasks):
            results.append(app.send_task("kmq.noop"))
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
    pki = FleetPKI.create(workdir / "pki")
    broker = MosquittoBroker(workdir=workdir / "mosquitto", pki=pki).start()
    redis_proc, redis_url = start_redis(workdir)
    workers: dict[str, WorkerProcess] = {}
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
        idle = {label: (worker.context_switches() - before[label]) * 30.0 / args.idle_seconds for label, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.stop()
        broker.stop()
        redis_proc.terminate()
        redis_proc.wait(timeout=10)

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
