"""The stock Celery app the transport benchmark runs on each broker, configured from the environment.

Worker: `celery -A _peer_app worker` with PYTHONPATH=bench (bench/_harness.peer_worker);
the benchmark builds its client with `make_app`. Settings are the ones the transport's
users run with: rpc:// results, acks_late, prefetch 1, concurrency 1.
Env: PEER_BROKER_URL, PEER_CA / PEER_CERT / PEER_KEY (TLS client identity), PEER_QUEUE, PEER_CLIENT_ID.
"""

from __future__ import annotations

import os

from celery import Celery

import kombu_mqtt  # noqa: F401  (registers mqtt:// and mqtts://)


def make_app(broker_url: str, ssl_options: dict[str, str] | None, queue: str, client_id: str | None = None) -> Celery:
    """A Celery app with rpc:// results, acks_late and one task, `peer.noop`."""
    app = Celery("peer", broker=broker_url, backend="rpc://", set_as_current=False)
    options: dict[str, str] = {}
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
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=None,
    )

    @app.task(name="peer.noop")
    def noop() -> None:
        return None

    return app


def _env_ssl() -> dict[str, str] | None:
    if not os.environ.get("PEER_CA"):
        return None
    return {"ca_certs": os.environ["PEER_CA"], "certfile": os.environ["PEER_CERT"], "keyfile": os.environ["PEER_KEY"]}


app = make_app(os.environ.get("PEER_BROKER_URL", "mqtt://127.0.0.1:1883"), _env_ssl(),
               os.environ.get("PEER_QUEUE", "peer.tasks"), os.environ.get("PEER_CLIENT_ID") or None)
