"""`edge-coordinator send` / `result`: one signed command to one agent, its result now or later.

Why a separate short-lived client (not the daemon): an operator's command must not
wait behind ingestion, and the daemon need not be running on this host — only the
broker must be reachable. The task goes to queue `agent.<id>`; the broker answers
PUBACK 0x10 when nobody consumes it (no agent session), which we report at once
instead of waiting for a result that can never come.

Arguments are checked against the command's signature (security.contract) before
anything is recorded or published. A result that does not arrive in time is not lost:
the agent also reports every command it ran as an `edge.command_result`, which the
running daemon journals; `result ID` reads it from there, bound to the agent the
`commands` table says was commanded (the ingest worker refuses results from others).
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
import uuid
from typing import Any
from urllib.parse import urlparse

from security import exit_codes
from security.contract import AGENT_COMMAND_PREFIX, AGENT_COMMANDS, CommandArgumentError, agent_queue, check_command_args

from . import commands
from .commands import SentCommand
from .config import CoordinatorConfig
from .errors import CoordinatorError
from .ingest import canonical_digest, first_command_result

COMMANDS = tuple(name[len(AGENT_COMMAND_PREFIX):] for name in AGENT_COMMANDS)
PREFIX = AGENT_COMMAND_PREFIX
POLL_SECONDS = 0.25


def command_name(task: str) -> str:
    short = task[len(PREFIX):] if task.startswith(PREFIX) else task
    if short not in COMMANDS:
        raise CoordinatorError(f"unknown command {task!r}: use one of {', '.join(COMMANDS)} (docs/INTERFACES.md)",
                               exit_codes.USAGE)
    return PREFIX + short


def _value(text: str) -> Any:
    """JSON when it parses (5, 2.5, null, "x"), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_args(raw: list[str]) -> list[Any]:
    """Each argument as JSON when it parses (5, 2.5, null, "x"), else as a plain string."""
    return [_value(v) for v in raw]


def parse_kwargs(kwargs_json: str | None, pairs: list[str] | None) -> dict[str, Any]:
    """`--kwargs '{"sensor": "simulated"}'` and/or `-k sensor=simulated` (value as JSON when it parses)."""
    out: dict[str, Any] = {}
    if kwargs_json:
        try:
            loaded = json.loads(kwargs_json)
        except ValueError as exc:
            raise CoordinatorError(f"--kwargs is not valid JSON ({exc}): e.g. --kwargs '{{\"seconds\": 5}}'",
                                   exit_codes.USAGE) from None
        if not isinstance(loaded, dict):
            raise CoordinatorError("--kwargs must be a JSON object, e.g. --kwargs '{\"seconds\": 5}'", exit_codes.USAGE)
        out.update(loaded)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CoordinatorError(f"-k {pair!r}: use -k name=value", exit_codes.USAGE)
        out[key] = _value(value)
    return out


def check_call(task: str, args: list[str], kwargs: dict[str, Any]) -> tuple[str, list[Any]]:
    """The full command name and the decoded args, or a usage CoordinatorError. Sends nothing."""
    name = command_name(task)
    values = parse_args(args)
    try:
        check_command_args(name, values, kwargs)
    except CommandArgumentError as exc:
        raise CoordinatorError(str(exc), exit_codes.USAGE) from None
    return name, values


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 8883), timeout=3):
            return True
    except OSError:
        return False


def _require_deliverable(cfg: CoordinatorConfig, agent: str) -> None:
    """Refuse commands to an agent that was never enrolled here or is revoked: one line, nothing sent."""
    from .fleet_pki import FleetStore

    store = FleetStore(cfg)
    if store.latest(agent) is None:
        raise CoordinatorError(f"agent {agent!r} is not enrolled here: see `edge-coordinator agents`",
                               exit_codes.NOT_DELIVERED)
    if store.is_revoked(agent):
        raise CoordinatorError(f"agent {agent!r} is revoked: it gets no commands; enroll a new certificate for it "
                               "(`edge-coordinator enroll CSR --force`) if it should rejoin", exit_codes.NOT_DELIVERED)


def send_command(cfg: CoordinatorConfig, agent: str, task: str, args: list[str], timeout: float | None = None, *,
                 kwargs: dict[str, Any] | None = None, countdown: float | None = None,
                 expires: float | None = None, wait: bool = True) -> dict[str, Any]:
    """Send one command; with `wait`, its result (status SUCCESS or FAILURE). Raises
    CoordinatorError with the exit code of the cause (usage, not delivered, timeout)."""
    from celery.exceptions import TimeoutError as CeleryTimeout
    from kombu.exceptions import OperationalError

    from security.pki import PKIError, validate_identity
    from security.signing import SigningError

    from .celery_app import make_app, require_mqtt_transport

    kwargs = dict(kwargs or {})
    try:
        validate_identity(agent)
    except PKIError as exc:
        raise CoordinatorError(str(exc), exit_codes.USAGE) from None
    name, values = check_call(task, args, kwargs)
    require_mqtt_transport()
    from kombu_mqtt import NoSubscribersError

    _require_deliverable(cfg, agent)
    timeout = cfg.worker.send_timeout if timeout is None else timeout
    if not _reachable(cfg.broker_url):
        raise CoordinatorError(f"cannot reach the broker at {cfg.broker_url}: is `edge-coordinator run` up (or broker.url right)?",
                               exit_codes.NOT_DELIVERED)
    # the digest covers what the agent will execute: the positional list, plus kwargs when given
    sent = SentCommand(task_id=str(uuid.uuid4()), agent_id=agent, command=name,
                       args_digest=canonical_digest([values, kwargs] if kwargs else values), sent_at=time.time())
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
            result = app.send_task(name, args=values, kwargs=kwargs, queue=agent_queue(agent), retry=False,
                                   task_id=sent.task_id, countdown=countdown, expires=expires)
        except NoSubscribersError:
            commands.forget(cfg.journal_path, sent.task_id)
            raise CoordinatorError(
                f"agent {agent!r} is not connected (nobody consumes queue {agent_queue(agent)}): start it, or check `edge-coordinator agents`",
                exit_codes.NOT_DELIVERED) from None
        except SigningError as exc:
            commands.forget(cfg.journal_path, sent.task_id)
            raise CoordinatorError(f"not sent: {exc}", exit_codes.USAGE) from None
        except OperationalError as exc:
            commands.forget(cfg.journal_path, sent.task_id)
            raise CoordinatorError(f"cannot reach the broker at {cfg.broker_url} ({exc}): is `edge-coordinator run` up?",
                                   exit_codes.NOT_DELIVERED) from None
        reply: dict[str, Any] = {"task_id": result.id, "agent": agent, "command": name}
        if not wait:
            return {**reply, "status": "SENT"}
        try:
            value = result.get(timeout=timeout, propagate=False)
        except CeleryTimeout:
            raise CoordinatorError(
                f"no result from {agent!r} for {name} within {timeout:g}s: the command stays queued for the agent "
                f"(task {result.id}); get its result later with `edge-coordinator result {result.id}`",
                exit_codes.TIMEOUT) from None
        except OperationalError as exc:
            raise CoordinatorError(f"lost the broker while waiting for {agent!r} ({exc}); get the result later with "
                                   f"`edge-coordinator result {result.id}`", exit_codes.TIMEOUT) from None
        return {
            **reply,
            "status": result.status,
            "result": value if result.successful() else repr(value),
            "seconds": round(time.monotonic() - started, 3),
        }
    finally:
        app.close()


def _find_command(conn: sqlite3.Connection, task_id: str) -> SentCommand:
    """The recorded command with this id (or unique id prefix), else a usage error."""
    rows = commands.find(conn, task_id)
    exact = [r for r in rows if r.task_id == task_id]
    if exact:
        return exact[0]
    if len(rows) > 1:
        raise CoordinatorError(f"task id prefix {task_id!r} is ambiguous: give more of it", exit_codes.USAGE)
    if not rows:
        raise CoordinatorError(f"no command with task id {task_id!r} was sent from this coordinator "
                               "(`edge-coordinator send` records each one in the journal)", exit_codes.USAGE)
    return rows[0]


def fetch_result(cfg: CoordinatorConfig, task_id: str, timeout: float = 0.0) -> dict[str, Any]:
    """The journaled result of a command sent earlier, waiting up to `timeout` seconds.

    Only a result reported by the agent the command was sent to counts (the `commands`
    table says which); the running daemon journals it when the agent reports it."""
    from ledger.sqlite_files import read_only

    path = cfg.journal_path
    if not path.exists():
        raise CoordinatorError(f"no journal at {path}: wrong --data-dir, or nothing was sent yet")
    deadline = time.monotonic() + max(0.0, timeout)
    try:
        while True:
            with read_only(path) as conn:
                try:
                    sent = _find_command(conn, task_id)
                except sqlite3.OperationalError:  # no commands table: nothing ever sent
                    raise CoordinatorError(f"no command with task id {task_id!r} was sent from this coordinator",
                                           exit_codes.USAGE) from None
                row = first_command_result(conn, sent.task_id, sent.agent_id)
            reply = {"task_id": sent.task_id, "agent": sent.agent_id, "command": sent.command, "sent_at": sent.sent_at}
            if row is not None:
                status, result, finished_at, received_at = row
                try:
                    value = json.loads(result)
                except (TypeError, ValueError):
                    value = result
                return {**reply, "status": status, "result": value, "finished_at": finished_at,
                        "received_at": received_at}
            if time.monotonic() >= deadline:
                raise CoordinatorError(
                    f"no result from {sent.agent_id!r} for {sent.command} (task {sent.task_id}) yet: it stays queued "
                    f"until the agent connects; retry with --timeout SECONDS (the daemon must run to journal it)",
                    exit_codes.TIMEOUT)
            time.sleep(POLL_SECONDS)
    except sqlite3.DatabaseError as exc:
        from .preflight import corrupt_database

        raise corrupt_database(path, exc) from None
