"""Bursts at prefetch 100 from several publishers: every task runs exactly once, nothing stalls.

Real Mosquitto over mutual TLS, a real `celery worker` (solo pool, acks_late) and
publishers that each own a connection. The worker appends each task id it runs to a
file, so the test counts executions by task id. The worker's keepalive is 600 s: a
delivery that only resumes on the keepalive tick (or its PINGRESP) shows up as a
stall here instead of being hidden by a short keepalive.

Knobs for exploring by hand (defaults are what the suite runs): KMQ_TASKS (10000),
KMQ_TASK_SECONDS (0: how long each task sleeps), KMQ_POOL (e.g. "-P threads -c 4").
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from celery import Celery

from tests.support.celery_apps import close_app
from tests.support.mosquitto import MosquittoBroker
from tests.transport.celery_app import make_app
from tests.transport.test_celery_worker import send_when_subscribed
from tests.transport.worker_proc import WorkerProcess, worker_env

pytestmark = pytest.mark.slow

TASKS = int(os.environ.get("KMQ_TASKS", "10000"))
PUBLISHERS = 4
PREFETCH = 100
POOL = tuple(os.environ.get("KMQ_POOL", "").split())
TASK_SECONDS = float(os.environ.get("KMQ_TASK_SECONDS", "0"))
#: No progress for this long = a stall (the worker's keepalive tick is 200 s away).
STALL_WINDOW = 60.0


class Burst:
    """One queue, one worker at prefetch 100 and a ledger file of executed task ids."""

    def __init__(self, mosquitto, test_pki, workdir: Path) -> None:
        self.queue = f"burst.{uuid.uuid4().hex[:8]}"
        self.ledger = workdir / "executed.txt"
        self.workdir = workdir
        self.url = mosquitto.tls_url
        self.env = worker_env(self.url, test_pki.ssl_options("worker"), self.queue, f"burst-{uuid.uuid4().hex[:8]}")
        self.env["KMQ_TRANSPORT_OPTIONS"] = json.dumps({"keepalive": 600})
        self.client_ssl = test_pki.ssl_options("client")
        self.apps: list[Celery] = []
        self.workers: list[WorkerProcess] = []

    def app(self) -> Celery:
        app = make_app(self.url, self.client_ssl, self.queue)
        self.apps.append(app)
        return app

    def start_worker(self) -> WorkerProcess:
        worker = WorkerProcess(
            self.env, self.workdir / "worker.log",
            extra_args=("--without-heartbeat", "--without-gossip", "--without-mingle", "--prefetch-multiplier", str(PREFETCH), *POOL),
        )
        self.workers.append(worker.start())
        return worker.wait_ready()

    def publish(self, count: int, publishers: int) -> set[str]:
        """Send `count` tasks from `publishers` threads, each with a connection of its own."""
        ids = [[str(uuid.uuid4()) for _ in range(count // publishers)] for _ in range(publishers)]
        errors: list[BaseException] = []
        start = threading.Barrier(publishers)

        def run(batch: list[str]) -> None:
            app = self.app()
            try:
                with app.connection_for_write() as conn:
                    producer = app.amqp.Producer(conn)
                    start.wait(timeout=60)
                    for task_id in batch:
                        app.send_task("kmq.record", args=(str(self.ledger), TASK_SECONDS), task_id=task_id, producer=producer, ignore_result=True)
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(batch,)) for batch in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert not any(thread.is_alive() for thread in threads), "a publisher did not finish in 600 s"
        assert not errors, errors
        return {task_id for batch in ids for task_id in batch}

    def executed(self) -> Counter[str]:
        if not self.ledger.exists():
            return Counter()
        return Counter(line for line in self.ledger.read_text().splitlines() if line)

    def wait_all(self, expected: set[str]) -> None:
        """Wait until every expected id ran; fail if the count stops moving for STALL_WINDOW."""
        last, moved = -1, time.monotonic()
        while True:
            seen = self.executed()
            done = len(expected & seen.keys())
            if done == len(expected):
                return
            if done != last:
                last, moved = done, time.monotonic()
            assert self.workers[-1].alive(), self.workers[-1].log()[-3000:]
            assert time.monotonic() - moved < STALL_WINDOW, f"delivery stalled at {done}/{len(expected)} tasks"
            time.sleep(0.2)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        for app in self.apps:
            close_app(app)


@pytest.fixture
def burst(mosquitto, test_pki, tmp_path):
    run = Burst(mosquitto, test_pki, tmp_path)
    try:
        yield run
    finally:
        run.close()


def assert_exactly_once(burst: Burst, expected: set[str]) -> None:
    burst.workers[-1].stop()  # warm shutdown: whatever it would still run has run
    seen = burst.executed()
    duplicated = {task_id: n for task_id, n in seen.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} tasks ran more than once"
    assert seen.keys() == expected


def test_burst_from_several_publishers_runs_every_task_exactly_once(burst: Burst) -> None:
    worker = burst.start_worker()
    warmup = burst.app()
    send_when_subscribed(warmup, "kmq.noop").get(timeout=60)
    expected = burst.publish(TASKS, PUBLISHERS)
    burst.wait_all(expected)
    assert worker.alive()
    assert_exactly_once(burst, expected)


def test_backlog_waiting_for_a_restarted_worker_flows_without_stalling(burst: Burst) -> None:
    """The worker reconnects to a persistent session holding the whole burst."""
    first = burst.start_worker()
    send_when_subscribed(burst.app(), "kmq.noop").get(timeout=60)
    first.stop()
    expected = burst.publish(TASKS, PUBLISHERS)
    burst.start_worker()
    burst.wait_all(expected)
    assert_exactly_once(burst, expected)


@pytest.fixture
def persistent_mosquitto(tmp_path: Path, test_pki):
    """A broker of this test's own that keeps sessions across a restart (like the coordinator's)."""
    store = tmp_path / "store"
    store.mkdir()
    broker = MosquittoBroker(
        workdir=tmp_path / "mosquitto", pki=test_pki,
        extra_config=f"persistence true\npersistence_location {store}/\nautosave_interval 1\n",
    ).start()
    yield broker
    broker.stop()


def test_worker_reconnecting_to_a_backlog_after_a_broker_restart_does_not_stall(persistent_mosquitto, test_pki, tmp_path) -> None:
    """The worker's connection drops under a backlog and resumes its session on the
    restarted broker. At-least-once here: acks in flight when the broker stopped may
    be lost, so a task may run twice; none may be missing or wait for a keepalive."""
    run = Burst(persistent_mosquitto, test_pki, tmp_path)
    try:
        run.start_worker()
        send_when_subscribed(run.app(), "kmq.noop").get(timeout=60)
        expected = run.publish(TASKS, PUBLISHERS)
        persistent_mosquitto.restart()
        run.wait_all(expected)
    finally:
        run.close()
