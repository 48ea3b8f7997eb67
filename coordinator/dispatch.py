"""`edge-coordinator send`: one signed command to one agent, one signed result back.

Why a separate short-lived client (not the daemon): an operator's command must not
wait behind ingestion, and the daemon need not be running on this host — only the
broker must be reachable. The task goes to queue `agent.<id>`; the broker answers
PUBACK 0x10 when nobody consumes it (no agent session), which we report at once
instead of waiting for a result that can never come.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from urllib.parse import urlparse
from typing import Any

from . import commands
from .commands import SentCommand
from .config import CoordinatorConfig
from .errors import CoordinatorError
from .ingest import canonical_digest

COMMANDS = ("sample_now", "set_interval", "status")
PREFIX = "edge.agent."


def command_name(task: str) -> str:
    short = task[len(PREFIX):] if task.startswith(PREFIX) else task
    if short not in COMMANDS:
        raise CoordinatorError(f"unknown command {task!r}: use one of {', '.join(COMMANDS)} (docs/INTERFACES.md)")
    return PREFIX + short


def parse_args(raw: list[str]) -> list[Any]:
    """Each argument as JSON when it parses (5, 2.5, null, "x"), else as a plain string."""
    out: list[Any] = []
    for value in raw:
        try:
            out.append(json.loads(value))
        except ValueError:
            out.append(value)
    return out


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 8883), timeout=3):
            return True
    except OSError:
        return False


def send_command(cfg: CoordinatorConfig, agent: str, task: str, args: list[str], timeout: float | None = None) -> dict[str, Any]:
    from celery.exceptions import TimeoutError as CeleryTimeout
    from kombu.exceptions import OperationalError

    from security.pki import PKIError, validate_identity

    from .celery_app import make_app, require_mqtt_transport

    require_mqtt_transport()
    from kombu_mqtt import NoSubscribersError

    try:
        validate_identity(agent)
    except PKIError as exc:
        raise CoordinatorError(str(exc)) from None
    name = command_name(task)
    timeout = cfg.worker.send_timeout if timeout is None else timeout
    if not _reachable(cfg.broker_url):
        raise CoordinatorError(f"cannot reach the broker at {cfg.broker_url}: is `edge-coordinator run` up (or broker.url right)?")
    values = parse_args(args)
    sent = SentCommand(task_id=str(uuid.uuid4()), agent_id=agent, command=name,
                       args_digest=canonical_digest(values), sent_at=time.time())
    app = make_app(cfg, consumer=False)
    started = time.monotonic()
    try:
        # Recorded before publishing: the agent's edge.command_result must find it, and only
        # the commanded agent's signed result (once) may answer (security/result_guard.py).
        expect = getattr(app.backend, "expect", None)
        if expect is None:
            raise CoordinatorError("the result backend cannot bind results to the commanded agent: "
                                   "set signing's rpc_reply_exchange (default c.rep)")
        commands.record(cfg.journal_path, sent)
        expect(sent.task_id, agent)
        try:
            result = app.send_task(name, args=values, queue=f"agent.{agent}", retry=False, task_id=sent.task_id)
        except NoSubscribersError:
            commands.forget(cfg.journal_path, sent.task_id)
            raise CoordinatorError(
                f"agent {agent!r} is not connected (nobody consumes queue agent.{agent}): start it, or check `edge-coordinator agents`"
            ) from None
        except OperationalError as exc:
            raise CoordinatorError(f"cannot reach the broker at {cfg.broker_url} ({exc}): is `edge-coordinator run` up?") from None
        try:
            value = result.get(timeout=timeout, propagate=False)
        except CeleryTimeout:
            raise CoordinatorError(
                f"no result from {agent!r} for {name} within {timeout:g}s (task {result.id}): the agent may be offline or busy; "
                "retry with a longer --timeout"
            ) from None
        except OperationalError as exc:
            raise CoordinatorError(f"lost the broker while waiting for {agent!r} ({exc})") from None
        return {
            "task_id": result.id,
            "agent": agent,
            "command": name,
            "status": result.status,
            "result": value if result.successful() else repr(value),
            "seconds": round(time.monotonic() - started, 3),
        }
    finally:
        app.close()
