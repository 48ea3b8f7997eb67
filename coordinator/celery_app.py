"""The coordinator's Celery app: MQTT over mutual TLS, signed tasks, acks after commit.

Why these settings: `task_acks_late` + `task_reject_on_worker_lost` mean a task is
acked only after its journal transaction committed, so a crash redelivers it and the
journal's unique task id makes the second run a no-op. The solo pool runs tasks in
the main thread, so a warm shutdown (SIGTERM) finishes the current task and leaves
the rest unacked in the broker's persistent session.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery, signals

from .config import CoordinatorConfig
from .errors import CoordinatorError
from .ingest import COMMAND_RESULT, HEARTBEAT, INGEST, Ingestor, TaskContext


def ssl_options(cfg: CoordinatorConfig) -> dict[str, str]:
    return {"ca_certs": str(cfg.ca_path), "certfile": str(cfg.cert_path), "keyfile": str(cfg.key_path)}


def require_mqtt_transport() -> None:
    """Import kombu_mqtt (registers mqtt/mqtts) or say how to fix the install."""
    try:
        import kombu_mqtt
    except ImportError as exc:
        raise CoordinatorError(f"the MQTT transport is not available ({exc}): reinstall with `make setup`") from None
    if getattr(kombu_mqtt, "__file__", None) is None:  # an editable install made before the package existed
        raise CoordinatorError(
            "kombu_mqtt is installed as an empty namespace package: reinstall with `.venv/bin/pip install -e .` (or `make setup`)"
        )


def make_app(cfg: CoordinatorConfig, *, consumer: bool) -> Celery:
    """A signing Celery app. `consumer=True` for the ingest worker (stable MQTT session)."""
    require_mqtt_transport()
    from security.celery_signing import SigningConfig, setup_signing
    from security.policy import coordinator_policy
    from security.signing import SigningError
    from security.pki import PKIError

    app = Celery("edge-coordinator", broker=cfg.broker_url, backend="rpc://", set_as_current=False)
    # the daemon rides out broker restarts; a one-shot client (`send`) fails fast
    transport: dict[str, Any] = {"publish_timeout": 15.0, "reconnect_timeout": 60.0 if consumer else 10.0}
    if consumer:
        transport["client_id"] = f"edge-coordinator-{cfg.identity}-{cfg.worker.queue}"
    app.conf.update(
        broker_use_ssl=ssl_options(cfg) if cfg.broker_url.startswith("mqtts") else None,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=max(1, cfg.worker.prefetch),
        worker_concurrency=1,
        worker_pool="solo",
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
        task_default_queue=cfg.worker.queue,
        result_expires=300,
        enable_utc=True,
    )
    signing = SigningConfig(
        key_path=cfg.key_path,
        cert_path=cfg.cert_path,
        ca_path=cfg.ca_path,
        crl_path=cfg.crl_path,
        replay_db=cfg.data_dir / "replay.sqlite",
        quarantine_db=cfg.data_dir / "quarantine.sqlite",
        # agents may cause only edge.ingest / edge.command_result / edge.heartbeat, under
        # their own contract ids, with no callbacks or canvas (security.policy)
        policy=coordinator_policy(cfg.identity),
    )
    try:
        setup_signing(app, signing)
    except (SigningError, PKIError) as exc:
        raise CoordinatorError(f"cannot set up signing: {exc}") from None
    return app


_received: dict[str, float] = {}


@signals.task_received.connect(weak=False)
def _stamp_received(request: Any = None, **_: Any) -> None:
    """Remember when the worker took the message, for the record's received_at."""
    if request is not None and getattr(request, "id", None):
        _received[request.id] = time.time()
        if len(_received) > 10000:
            _received.clear()


def _cert_not_after(pem: str, cache: dict[str, float]) -> float | None:
    if pem in cache:
        return cache[pem]
    from cryptography import x509

    try:
        value = x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc.timestamp()
    except ValueError:
        return None
    cache[pem] = value
    return value


def register_tasks(app: Celery, ingestor: Ingestor) -> None:
    """edge.ingest / edge.command_result / edge.heartbeat, all executed by `ingestor`."""
    not_after: dict[str, float] = {}

    def execute(task: Any, name: str, payload: Any) -> dict[str, Any]:
        signer = getattr(task.request, "signer", None)
        if signer is None:  # the signing strategy refuses unsigned messages before this
            raise CoordinatorError(f"{name} {task.request.id} arrived without a verified signer")
        ctx = TaskContext(
            task_id=task.request.id,
            task_name=name,
            signer=signer,
            received_at=_received.pop(task.request.id, time.time()),
            cert_not_after=_cert_not_after(signer.certificate_pem, not_after),
        )
        return ingestor.run(ctx, payload)

    @app.task(name=INGEST, bind=True, ignore_result=True, acks_late=True)
    def ingest(self: Any, reading: Any = None) -> dict[str, Any]:
        return execute(self, INGEST, reading)

    @app.task(name=COMMAND_RESULT, bind=True, ignore_result=True, acks_late=True)
    def command_result(self: Any, result: Any = None) -> dict[str, Any]:
        return execute(self, COMMAND_RESULT, result)

    @app.task(name=HEARTBEAT, bind=True, ignore_result=True, acks_late=True)
    def heartbeat(self: Any, status: Any = None) -> dict[str, Any]:
        return execute(self, HEARTBEAT, status)
