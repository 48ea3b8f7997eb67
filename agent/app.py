"""The agent's Celery app: device settings, command tasks, and the runtime bootstep.

Why these settings: a device runs one task at a time (solo pool, concurrency 1,
prefetch 1), talks to nobody but the broker (no gossip, mingle or worker heartbeat
events), and consumes only its own queue `agent.<id>` on a stable MQTT session, so
commands sent while it was offline wait in the broker for it.
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

from celery import Celery, bootsteps
from celery.signals import task_postrun, worker_shutting_down
from kombu import Exchange, Queue

from security.contract import AGENT_COMMANDS, INGEST_QUEUE

from .config import AgentConfig
from .errors import AgentError
from .runtime import AgentRuntime

log = logging.getLogger("edge.agent")

COMMANDS = AGENT_COMMANDS


def _load_transport() -> None:
    """Register mqtt:// and mqtts:// with kombu (kombu_mqtt does it on import)."""
    from kombu.transport import TRANSPORT_ALIASES

    try:
        import kombu_mqtt  # noqa: F401
    except ImportError as exc:
        raise AgentError(f"MQTT transport kombu_mqtt is not installed ({exc}): reinstall edgeledger") from exc
    if "mqtts" not in TRANSPORT_ALIASES:
        raise AgentError("kombu_mqtt did not register mqtts:// (stale editable install?): run `pip install -e .` again")


def _setup_signing(app: Celery, cfg: AgentConfig) -> None:
    try:
        from security.pki import PKIError
        from security.signing import SigningError
        from security.signing_config import SigningConfig
        from security.signing_setup import setup_signing
    except ImportError as exc:
        raise AgentError(f"signing is on but security.signing_setup is unavailable ({exc}): set signing = false or reinstall") from exc
    try:
        _call_setup(setup_signing, SigningConfig, app, cfg)
    except (SigningError, PKIError) as exc:
        raise AgentError(f"cannot set up signing: {exc}") from exc


def _call_setup(setup_signing: Any, SigningConfig: Any, app: Celery, cfg: AgentConfig) -> None:
    from security.contract import DEFAULT_COORDINATOR_IDENTITY
    from security.policy import agent_policy

    # Only the coordinator identity may command this agent, and only with edge.agent.*
    # tasks (no built-ins, no canvas); an empty list means the default identity.
    signers = frozenset(cfg.command_signers or [DEFAULT_COORDINATOR_IDENTITY])
    setup_signing(
        app,
        SigningConfig(
            key_path=cfg.key_file,
            cert_path=cfg.cert_file,
            ca_path=cfg.ca_file,
            crl_path=cfg.crl_file if cfg.crl_file.exists() else None,
            allowed_signers=signers,
            policy=agent_policy(signers),
        ),
    )


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def wake_hub_on_shutdown(worker: Any) -> None:
    """Make SIGTERM/SIGINT stop an idle event-driven worker at once.

    Why: Celery's handler only sets a flag; the interrupted epoll is retried (PEP 475)
    and, with an event-driven transport and no short timers, the loop sees the flag
    only at its next timer (up to keepalive/3 later). Writing to the hub's waker
    socket (no locks: safe in a signal handler) makes the poll return now.
    """

    def wake(sender: Any = None, **_: Any) -> None:
        waker = getattr(getattr(worker, "hub", None), "_waker", None)
        if waker is not None:
            waker.wake()

    worker_shutting_down.connect(wake, weak=False)


def take_certificate_on_hup(runtime: AgentRuntime) -> None:
    """SIGHUP: take up a renewed certificate (`edge-agent renew --cert`) without a restart.

    Replaces Celery's own SIGHUP handler (installed before the steps start), which would
    re-exec the process: that breaks the one-file binary and is not needed for a new
    certificate with the same key."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda *_: runtime.request_certificate_reload())


class AgentStep(bootsteps.StartStopStep):
    """Starts the sampler/forwarder thread with the worker and stops it with the worker."""

    label = "edge-agent runtime"

    def start(self, worker: Any) -> None:
        wake_hub_on_shutdown(worker)
        worker.app.edge_runtime.start()
        take_certificate_on_hup(worker.app.edge_runtime)

    def stop(self, worker: Any) -> None:
        worker.app.edge_runtime.stop()

    def shutdown(self, worker: Any) -> None:
        worker.app.edge_runtime.stop()


def configure(app: Celery, cfg: AgentConfig) -> None:
    ssl_opts = {
        "ca_certs": str(cfg.ca_file),
        "certfile": str(cfg.cert_file),
        "keyfile": str(cfg.key_file),
        "cert_reqs": ssl.CERT_REQUIRED,
    }
    app.conf.update(
        broker_url=cfg.broker_url,
        broker_use_ssl=ssl_opts if cfg.broker_url.startswith("mqtts") else None,
        broker_transport_options={
            "client_id": cfg.client_id,  # the consuming (durable) session only; others are random
            "keepalive": int(cfg.broker_heartbeat),
            "publish_timeout": cfg.publish_timeout,
            "connect_timeout": min(cfg.publish_timeout, 10.0),
            # A dropped connection is retried inside the transport for at most
            # publish_timeout; after that the outbox's own jittered backoff takes over.
            "reconnect_timeout": cfg.publish_timeout,
            "reconnect_min_delay": min(cfg.backoff_min, 0.1),
            "reconnect_max_delay": min(cfg.backoff_max, 10.0),
        },
        broker_heartbeat=cfg.broker_heartbeat,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a device keeps trying forever
        result_backend="rpc://",
        result_persistent=False,
        worker_pool="solo",
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=cfg.remote_control,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_send_sent_event=False,
        worker_hijack_root_logger=True,
        task_default_queue=cfg.queue,
        task_queues=[
            Queue(cfg.queue, Exchange(cfg.queue, "direct"), routing_key=cfg.queue),
            Queue(INGEST_QUEUE, Exchange(INGEST_QUEUE, "direct"), routing_key=INGEST_QUEUE, no_declare=True),
        ],
        task_create_missing_queues=False,
        task_annotations={name: {"rate_limit": rate} for name, rate in cfg.rate_limits.items()},
        enable_utc=True,
    )


def register_tasks(app: Celery, runtime: AgentRuntime) -> None:
    @app.task(name="edge.agent.sample_now", shared=False)
    def sample_now(sensor: str | None = None) -> list[dict]:
        """Sample now; readings go through the outbox like scheduled ones."""
        return runtime.sample_now(sensor)

    @app.task(name="edge.agent.set_interval", shared=False)
    def set_interval(seconds: float) -> dict:
        return runtime.set_interval(seconds)

    @app.task(name="edge.agent.status", shared=False)
    def status() -> dict:
        return runtime.status()

    # Not in COMMANDS: pushed by the coordinator daemon (no edge.command_result for it).
    @app.task(name="edge.agent.update_crl", shared=False)
    def update_crl(crl_pem: str) -> dict:
        return runtime.update_crl(crl_pem)

    # Not in COMMANDS either: the coordinator's end-to-end receipt (coordinator/receipts.py).
    @app.task(name="edge.agent.receipt", shared=False, ignore_result=True)
    def receipt(receipt: dict) -> dict:
        return runtime.apply_receipt(receipt)

    def report(sender: Any = None, task_id: str | None = None, task: Any = None, retval: Any = None,
               state: str | None = None, **_: Any) -> None:
        if task is None or task.app is not app or task.name not in COMMANDS or task_id is None:
            return
        ok = state == "SUCCESS"
        runtime.report_command(task.name, task_id, "SUCCESS" if ok else "FAILURE",
                               _json_safe(retval) if ok else str(retval))

    task_postrun.connect(report, weak=False)


def create_app(cfg: AgentConfig) -> Celery:
    """A configured agent app with its runtime attached as `app.edge_runtime`."""
    if cfg.broker_url.startswith("mqtt"):
        _load_transport()
    app = Celery(f"edge-agent-{cfg.agent_id}", set_as_current=False)
    configure(app, cfg)
    if cfg.signing:
        _setup_signing(app, cfg)
    runtime = AgentRuntime(app, cfg)
    app.edge_runtime = runtime  # type: ignore[attr-defined]
    # another device with this agent id taking the consuming session over (agent.takeover)
    app.conf.broker_transport_options = {**(app.conf.broker_transport_options or {}), "on_takeover": runtime.takeover}
    register_tasks(app, runtime)
    app.steps["worker"].add(AgentStep)
    return app


def start_worker(app: Celery, cfg: AgentConfig, on_ready: Any = None) -> int:
    """Run the worker in this process until it is told to stop; returns its exit code."""
    from celery.signals import worker_ready

    if on_ready is not None:
        worker_ready.connect(on_ready, weak=False)
    worker = app.Worker(
        hostname=f"agent@{cfg.agent_id}",
        pool="solo",
        concurrency=1,
        prefetch_multiplier=1,
        queues=[cfg.queue],
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        loglevel=cfg.log_level,
        quiet=True,
        redirect_stdouts=False,
    )
    worker.start()
    return int(worker.exitcode or 0)
