"""A stock `celery worker` subprocess over kombu_mqtt (mqtts, solo, prefetch 1, acks_late)."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from celery import Celery
from kombu import Consumer

import kombu_mqtt
from tests.support.celery_apps import close_app
from tests.transport.celery_app import make_app
from tests.transport.worker_proc import CELERY, ROOT, WorkerProcess, worker_env

pytestmark = pytest.mark.slow


def send_when_subscribed(app: Celery, name: str, args: tuple = (), timeout: float = 30.0):
    """Send a task, retrying while the worker has not subscribed its queue yet (PUBACK 0x10)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return app.send_task(name, args=args)
        except kombu_mqtt.NoSubscribersError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Deployment:
    """One worker (subprocess) plus a client app in this process, sharing a queue."""

    def __init__(self, mosquitto, test_pki, workdir: Path, url_kind: str = "tls") -> None:
        self.queue = f"kmq.{uuid.uuid4().hex[:8]}"
        self.node = f"kmq-{uuid.uuid4().hex[:6]}@localhost"
        self.client_id = f"worker-{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        tls = url_kind == "tls"
        self.url = mosquitto.tls_url if tls else mosquitto.plain_url
        worker_ssl = test_pki.ssl_options("worker") if tls else None
        self.env = worker_env(self.url, worker_ssl, self.queue, self.client_id)
        self.app = make_app(self.url, test_pki.ssl_options("client") if tls else None, self.queue)
        self.workers: list[WorkerProcess] = []

    def start_worker(self, prefetch: int = 1, name: str | None = None) -> WorkerProcess:
        """Start a worker; `name` makes a second member (own client id, node name and log)."""
        env = dict(self.env, KMQ_CLIENT_ID=f"{self.client_id}-{name}") if name else self.env
        node = f"{name}-{self.node}" if name else self.node
        worker = WorkerProcess(
            env, self.workdir / f"worker{'-' + name if name else ''}.log",
            extra_args=(
                "--without-heartbeat", "--without-gossip", "--without-mingle", "-E", "-n", node,
                "--prefetch-multiplier", str(prefetch),
            ),
        )
        self.workers.append(worker.start())
        return worker.wait_ready()

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        close_app(self.app)


@pytest.fixture(scope="module")
def deployment(mosquitto, test_pki, tmp_path_factory) -> Iterator[Deployment]:
    dep = Deployment(mosquitto, test_pki, tmp_path_factory.mktemp("worker"))
    try:
        dep.start_worker()
        yield dep
    finally:
        dep.close()


def test_worker_runs_task_and_returns_result_over_rpc_tls(deployment: Deployment) -> None:
    assert send_when_subscribed(deployment.app, "kmq.add", (2, 3)).get(timeout=30) == 5
    results = [deployment.app.send_task("kmq.add", args=(i, i)) for i in range(50)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(50)]


def test_control_ping_and_stock_inspect_cli_see_the_worker(deployment: Deployment) -> None:
    send_when_subscribed(deployment.app, "kmq.noop").get(timeout=30)
    replies = deployment.app.control.ping(destination=[deployment.node], timeout=5)
    assert replies == [{deployment.node: {"ok": "pong"}}]
    cli = subprocess.run(
        [CELERY, "-A", "tests.transport.celery_app", "inspect", "ping", "-d", deployment.node, "-t", "10"],
        env=deployment.env, cwd=str(ROOT), capture_output=True, text=True, timeout=60,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "pong" in cli.stdout and deployment.node in cli.stdout


def test_garbage_on_the_queue_topic_does_not_crash_the_worker(deployment: Deployment, mosquitto) -> None:
    send_when_subscribed(deployment.app, "kmq.noop").get(timeout=30)
    raw = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    raw.connect("127.0.0.1", mosquitto.plain_port)
    raw.loop_start()
    try:
        topic = f"kombu/d/{deployment.queue}/{deployment.queue}"
        raw.publish(topic, b"\xff\xfe definitely not a kombu message", qos=1).wait_for_publish(10)
    finally:
        raw.loop_stop()
        raw.disconnect()
    assert deployment.app.send_task("kmq.add", args=(20, 22)).get(timeout=30) == 42
    worker = deployment.workers[-1]
    assert worker.alive()
    assert "is not a kombu message" in worker.log()


def test_idle_worker_wakes_rarely(deployment: Deployment) -> None:
    """Event driven: no 1 s polling. Counted in context switches, not wall time."""
    send_when_subscribed(deployment.app, "kmq.noop").get(timeout=30)
    worker = deployment.workers[-1]
    time.sleep(2)  # let the last task's bookkeeping settle
    before = worker.context_switches()
    time.sleep(15)
    wakeups = worker.context_switches() - before
    print(f"idle wakeups in 15 s: {wakeups}")
    assert wakeups <= 10, f"idle worker woke {wakeups} times in 15 s"


def test_sigkilled_worker_gets_the_task_again_after_restart(mosquitto, test_pki, tmp_path) -> None:
    dep = Deployment(mosquitto, test_pki, tmp_path)
    try:
        first = dep.start_worker()
        marker = tmp_path / "started"
        result = send_when_subscribed(dep.app, "kmq.slow_once", (str(marker), 120))
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, "task never started"
            time.sleep(0.05)
        first.kill()
        assert not first.alive()
        second = dep.start_worker()
        assert result.get(timeout=60) == f"redelivered:{second.pid}"
    finally:
        dep.close()


def test_eta_task_does_not_block_the_next_task(deployment: Deployment) -> None:
    """Celery raises prefetch while it holds an ETA task; the transport must follow (Receive Maximum)."""
    send_when_subscribed(deployment.app, "kmq.noop").get(timeout=30)
    eta = deployment.app.send_task("kmq.add", args=(1, 1), countdown=4)
    started = time.monotonic()
    assert deployment.app.send_task("kmq.add", args=(2, 2)).get(timeout=30) == 4
    assert not eta.ready() or time.monotonic() - started < 4
    assert eta.get(timeout=30) == 2


def test_remote_control_inspect_reports_the_queue(deployment: Deployment) -> None:
    send_when_subscribed(deployment.app, "kmq.noop").get(timeout=30)
    queues = deployment.app.control.inspect([deployment.node], timeout=5).active_queues()
    assert [q["name"] for q in queues[deployment.node]] == [deployment.queue]


def test_event_receiver_gets_task_events(deployment: Deployment) -> None:
    """The worker runs with -E: task events go over the topic exchange `celeryev`."""
    app = deployment.app
    send_when_subscribed(app, "kmq.noop").get(timeout=30)
    seen: list[dict] = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"task-succeeded": seen.append})
        (consumer,) = receiver.get_consumers(partial(Consumer, conn.default_channel), conn.default_channel)
        with consumer:
            result = app.send_task("kmq.add", args=(3, 4))
            assert result.get(timeout=30) == 7
            deadline = time.monotonic() + 30
            while not any(event.get("uuid") == result.id for event in seen):
                assert time.monotonic() < deadline, f"no task-succeeded event for {result.id}: {seen}"
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass


def test_worker_and_client_recover_after_broker_restart(fresh_mosquitto, test_pki, tmp_path) -> None:
    dep = Deployment(fresh_mosquitto, test_pki, tmp_path)
    try:
        dep.start_worker()
        assert send_when_subscribed(dep.app, "kmq.add", (1, 2)).get(timeout=30) == 3
        fresh_mosquitto.restart()  # in-memory broker: sessions are gone, the worker must resubscribe
        assert send_when_subscribed(dep.app, "kmq.add", (2, 3), timeout=60).get(timeout=60) == 5
        assert dep.workers[-1].alive()
    finally:
        dep.close()


def test_burst_with_prefetch_above_one_keeps_flowing(mosquitto, test_pki, tmp_path) -> None:
    """Regression: with prefetch > 1 the broker hands over more than prefetch; the
    buffered rest must flow as Celery acks (its acks go through hub.call_soon)."""
    dep = Deployment(mosquitto, test_pki, tmp_path)
    try:
        dep.start_worker(prefetch=4)
        send_when_subscribed(dep.app, "kmq.noop").get(timeout=30)
        results = [dep.app.send_task("kmq.add", args=(i, 1)) for i in range(400)]
        # One overall budget (a stall used to cost ~10 s per `prefetch` tasks, i.e. minutes).
        deadline = time.monotonic() + 60
        values = [r.get(timeout=max(0.1, deadline - time.monotonic())) for r in results]
        assert values == [i + 1 for i in range(400)]
    finally:
        dep.close()


def test_task_for_a_queue_nobody_ever_consumed_raises_no_subscribers(deployment: Deployment) -> None:
    queue = f"nobody.{uuid.uuid4().hex[:8]}"
    with pytest.raises(kombu_mqtt.NoSubscribersError, match=f"topic .kombu/d/.*{queue}.*start a worker"):
        deployment.app.send_task("kmq.add", args=(1, 1), queue=queue)


def test_tasks_sent_while_the_worker_is_down_wait_in_its_session(mosquitto, test_pki, tmp_path) -> None:
    """Warm shutdown keeps the persistent subscription: the queue outlives the worker."""
    dep = Deployment(mosquitto, test_pki, tmp_path)
    try:
        first = dep.start_worker()
        assert send_when_subscribed(dep.app, "kmq.add", (1, 1)).get(timeout=30) == 2
        first.stop()
        assert not first.alive()
        pending = dep.app.send_task("kmq.add", args=(20, 1))  # no NoSubscribersError: the session holds the queue
        second = dep.start_worker()
        assert pending.get(timeout=60) == 21
        assert second.alive()
    finally:
        dep.close()


def test_two_workers_share_one_queue(mosquitto, test_pki, tmp_path) -> None:
    """$share/<queue>/...: each task goes to exactly one of the group's members."""
    dep = Deployment(mosquitto, test_pki, tmp_path)
    try:
        first, second = dep.start_worker(), dep.start_worker(name="b")
        send_when_subscribed(dep.app, "kmq.noop").get(timeout=30)
        deadline = time.monotonic() + 30
        while "succeeded" not in second.log():  # until the second member has joined the group
            assert time.monotonic() < deadline, "second worker never got a task"
            dep.app.send_task("kmq.noop").get(timeout=30)
        results = [dep.app.send_task("kmq.whoami") for _ in range(40)]
        pids = [r.get(timeout=30) for r in results]
        assert set(pids) == {first.pid, second.pid}
        ran = sum(
            line.count("succeeded")
            for worker in (first, second)
            for line in worker.log().splitlines()
            if "kmq.whoami[" in line
        )
        assert ran == 40  # no task ran twice
    finally:
        dep.close()
