"""A stock Celery app over kombu_mqtt, configured from environment variables.

Used as `celery -A tests.transport.celery_app worker` by the tests and by
bench/transport.py; the test process builds its client app with `make_app`.
Env: KMQ_BROKER_URL, KMQ_CA / KMQ_CERT / KMQ_KEY (TLS client identity),
KMQ_QUEUE, KMQ_CLIENT_ID, KMQ_PREFETCH, KMQ_TRANSPORT_OPTIONS (JSON object merged into
broker_transport_options).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from celery import Celery

import kombu_mqtt  # noqa: F401  (registers mqtt:// and mqtts://)


def make_app(
    broker_url: str,
    ssl_options: dict | None,
    queue: str,
    client_id: str | None = None,
    prefetch: int = 1,
    transport_options: dict | None = None,
) -> Celery:
    """A Celery app with rpc:// results, acks_late and the test tasks."""
    app = Celery("kmq", broker=broker_url, backend="rpc://", set_as_current=False)
    options: dict = dict(transport_options or {})
    if client_id:
        options["client_id"] = client_id
    if ssl_options:
        options["identity"] = ssl_options["certfile"]  # own pooled connections per identity
    app.conf.update(
        broker_use_ssl=ssl_options,
        broker_transport_options=options,
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=prefetch,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=None,
    )

    @app.task(name="kmq.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="kmq.noop")
    def noop() -> None:
        return None

    @app.task(name="kmq.record", bind=True)
    def record(self, path: str, seconds: float = 0.0) -> None:
        """Append this task's id to `path` (one line per execution: the tests count them)."""
        if seconds:
            time.sleep(seconds)  # a task that takes a while, like a journal commit
        with open(path, "a", encoding="ascii") as ledger:
            ledger.write(self.request.id + "\n")

    @app.task(name="kmq.whoami")
    def whoami() -> int:
        return os.getpid()

    @app.task(name="kmq.slow_once")
    def slow_once(marker: str, seconds: float) -> str:
        """First run: write `marker` and sleep (the test kills us); later runs return at once."""
        path = Path(marker)
        if not path.exists():
            path.write_text(str(os.getpid()))
            time.sleep(seconds)
            return "slept"
        return f"redelivered:{os.getpid()}"

    return app


def _env_ssl() -> dict | None:
    if not os.environ.get("KMQ_CA"):
        return None
    return {"ca_certs": os.environ["KMQ_CA"], "certfile": os.environ["KMQ_CERT"], "keyfile": os.environ["KMQ_KEY"]}


app = make_app(
    os.environ.get("KMQ_BROKER_URL", "mqtt://127.0.0.1:1883"),
    _env_ssl(),
    os.environ.get("KMQ_QUEUE", "kmq.tasks"),
    os.environ.get("KMQ_CLIENT_ID") or None,
    int(os.environ.get("KMQ_PREFETCH", "1")),
    json.loads(os.environ.get("KMQ_TRANSPORT_OPTIONS") or "{}"),
)
