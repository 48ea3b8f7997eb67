"""The coordinator's Celery app: MQTT over mutual TLS, signed tasks, acks after commit.

Why these settings: `task_acks_late` + `task_reject_on_worker_lost` mean a task is
acked only after its journal transaction committed, so a crash redelivers it and the
journal's unique task id makes the second run a no-op. Admitted tasks run in batches
(coordinator.batch): up to worker.batch_size per journal transaction, each acked only
after that commit. Everything runs in the main thread, so a warm shutdown (SIGTERM)
finishes the current batch and leaves the rest unacked in the broker's persistent session.

A task (a batch) whose journal write fails is never acked (`task_acks_on_failure_or_timeout`
off): it goes back to the broker (`Reject(requeue=True)`, after a short pause and with
its replay-guard entry released so the redelivery passes), is counted in
`edgeledger_journal_write_failures_total`, and ingestion resumes by itself once the
journal is writable again. The agent keeps the reading anyway until its receipt.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject

from .batch import BatchConsumer
from .config import CoordinatorConfig
from .errors import CoordinatorError
from .ingest import COMMAND_RESULT, COSIGN, HEARTBEAT, INGEST, Ingestor, TaskContext

log = logging.getLogger("edgeledger.coordinator.ingest")

JOURNAL_RETRY_PAUSE = 1.0  # seconds before a task the journal refused goes back to the broker
# app.conf keys make_app fills from worker.batch_size / worker.batch_wait for register_tasks
BATCH_SIZE_KEY, BATCH_WAIT_KEY = "edgeledger_batch_size", "edgeledger_batch_wait"


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
    from security.contract import RESENDABLE_TASKS
    from security.pki import PKIError
    from security.policy import coordinator_policy
    from security.signing import SigningError
    from security.signing_config import SigningConfig
    from security.signing_setup import setup_signing

    from .remote_control import operator_only_node

    app = Celery("edge-coordinator", broker=cfg.broker_url, backend="rpc://", set_as_current=False)
    # the daemon rides out broker restarts; a one-shot client (`send`) fails fast
    broker = cfg.broker
    transport: dict[str, Any] = {
        "keepalive": broker.keepalive,
        "publish_timeout": broker.publish_timeout,
        "reconnect_timeout": broker.reconnect_timeout if consumer else broker.command_reconnect_timeout,
    }
    if consumer:
        transport["client_id"] = f"edge-coordinator-{cfg.identity}-{cfg.worker.queue}"
    app.conf.update(
        broker_use_ssl=ssl_options(cfg) if cfg.broker_url.startswith("mqtts") else None,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=False,  # a failed journal write must not ack (see module doc)
        worker_prefetch_multiplier=max(1, cfg.worker.prefetch),
        worker_concurrency=1,
        worker_pool="solo",
        worker_hijack_root_logger=False,
        # Celery's tooling (coordinator.tooling, Flower): the broker gives the pidbox and
        # event topics to coordinator certificates only, and control messages must be
        # signed (accept_content), see security/README.md "Remote control". Task events
        # are opt-in (worker.task_events): Flower enables them in the running worker.
        worker_send_task_events=cfg.worker.task_events,
        task_send_sent_event=cfg.worker.task_events,
        worker_enable_remote_control=True,
        task_default_queue=cfg.worker.queue,
        result_expires=300,
        enable_utc=True,
        **{BATCH_SIZE_KEY: cfg.worker.batch_size, BATCH_WAIT_KEY: cfg.worker.batch_wait},
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
        policy=coordinator_policy(cfg.identity, peers=cfg.peers),
        resend_tasks=RESENDABLE_TASKS,  # re-sends are deduped by the journal's unique task id
    )
    try:
        ctx = setup_signing(app, signing)
    except (SigningError, PKIError) as exc:
        raise CoordinatorError(f"cannot set up signing: {exc}") from None
    # the worker runs control commands signed by the coordinator identity only (the broker ACL is the first lock)
    app.control.mailbox.node_cls = operator_only_node(ctx.verifier, frozenset({cfg.identity}))
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


class JournalOutage:
    """Logs a journal outage once per episode (with the fix) and counts every refused write."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor
        self.failing = False
        self._wake = threading.Event()  # never set: a pause that is not a bare sleep

    def failed(self, app: Celery, task: Any, signer: Any, exc: sqlite3.Error) -> Reject:
        """One task (the per-task path): count, log once, release, pause; the Reject to raise."""
        self._refused(app, [(task.name, task.request.id, task.request.retries, signer)], exc)
        return Reject(f"journal unwritable: {exc}", requeue=True)

    def failed_batch(self, app: Celery, batch: list[tuple[Any, Any]], exc: sqlite3.Error) -> None:
        """A whole batch (coordinator.batch): each (request, signer) goes back to the broker unacked."""
        self._refused(app, [(r.name, r.id, r.request_dict.get("retries"), signer) for r, signer in batch], exc)
        for request, _ in batch:
            request.reject(requeue=True)  # on a closed channel a no-op (kombu_mqtt): the broker redelivers it

    def _refused(self, app: Celery, tasks: list[tuple[str, str, Any, Any]], exc: sqlite3.Error) -> None:
        from security.admission import replay_key
        from security.app_signing import signing_context

        for name, _, _, _ in tasks:
            self.ingestor.metrics.inc("edgeledger_journal_write_failures_total", task=name)
        if not self.failing:
            self.failing = True
            log.error(
                "journal %s cannot be written (%s): tasks stay in the broker and are retried every %.0fs. "
                "Fix: free disk space, make the file and its -wal/-shm writable (chattr -i, permissions), "
                "or stop whatever holds its write lock", self.ingestor.journal.path, exc, JOURNAL_RETRY_PAUSE)
        ctx = signing_context(app)
        if ctx is not None:  # let the requeued copy of this very envelope pass the replay guard
            for _, task_id, retries, signer in tasks:
                ctx.guard.release(replay_key(signer.agent_id, task_id, retries), signer.envelope_digest)
        self._wake.wait(JOURNAL_RETRY_PAUSE)  # do not spin on a journal that stays unwritable

    def ok(self) -> None:
        if self.failing:
            self.failing = False
            log.warning("journal %s is writable again: ingestion resumed", self.ingestor.journal.path)


def register_tasks(app: Celery, ingestor: Ingestor, batch_size: int | None = None,
                   batch_wait: float | None = None) -> BatchConsumer:
    """edge.ingest / edge.command_result / edge.heartbeat / edge.witness_cosign, executed by
    `ingestor` in batches of up to `batch_size` per journal transaction (coordinator.batch;
    default: what make_app read from worker.batch_size / worker.batch_wait, capped at the
    prefetch). A task called directly (`apply`) still runs on its own."""
    not_after: dict[str, float] = {}
    outage = JournalOutage(ingestor)

    def context(request: Any, name: str) -> TaskContext:
        signer = getattr(request, "signer", None)
        if signer is None:  # the signing strategy refuses unsigned messages before this
            raise CoordinatorError(f"{name} {request.id} arrived without a verified signer")
        return TaskContext(
            task_id=request.id,
            task_name=name,
            signer=signer,
            received_at=_received.pop(request.id, time.time()),
            cert_not_after=_cert_not_after(signer.certificate_pem, not_after),
        )

    size = batch_size if batch_size is not None else app.conf.get(BATCH_SIZE_KEY, 1)
    wait = batch_wait if batch_wait is not None else app.conf.get(BATCH_WAIT_KEY, 0.0)
    batches = BatchConsumer(app, ingestor, outage, context, min(int(size), app.conf.worker_prefetch_multiplier), wait)

    def execute(task: Any, name: str, payload: Any) -> dict[str, Any]:
        ctx = context(task.request, name)
        try:
            result = ingestor.run(ctx, payload)
        except sqlite3.Error as exc:  # journal unwritable: back to the broker, never acked
            raise outage.failed(app, task, ctx.signer, exc) from None
        outage.ok()
        return result

    options = dict(bind=True, ignore_result=True, acks_late=True, admitted_strategy=batches.strategy)

    @app.task(name=INGEST, **options)
    def ingest(self: Any, reading: Any = None) -> dict[str, Any]:
        return execute(self, INGEST, reading)

    @app.task(name=COMMAND_RESULT, **options)
    def command_result(self: Any, result: Any = None) -> dict[str, Any]:
        return execute(self, COMMAND_RESULT, result)

    @app.task(name=HEARTBEAT, **options)
    def heartbeat(self: Any, status: Any = None) -> dict[str, Any]:
        return execute(self, HEARTBEAT, status)

    @app.task(name=COSIGN, **options)
    def witness_cosign(self: Any, cosignature: Any = None) -> dict[str, Any]:
        return execute(self, COSIGN, cosignature)

    return batches
