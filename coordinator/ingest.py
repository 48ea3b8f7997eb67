"""Executing the coordinator's tasks: store, journal, register — in one transaction.

Why one transaction: a reading stored without its execution record (or the reverse)
would make the audit lie. The journal's unique task_id is the exactly-once guard:
when `append` reports the id already journaled (a redelivery after a crash before the
ack), nothing else is written either, so a redelivered task is stored once.

Celery-free on purpose: the worker's tasks are thin wrappers around `Ingestor`, and
tests can drive it with a real Journal.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import sqlite_utils

from ledger.journal import Journal, with_cosignatures
from ledger.record import ExecutionRecord
from ledger.tlog.cosignature import CosignatureV1Verifier
from ledger.tlog.errors import TlogError
from ledger.tlog.note import open_note
from security.app_signing import ensure_bound
from security.contract import COMMAND_RESULT_TASK, HEARTBEAT_TASK, INGEST_TASK, WITNESS_COSIGN_TASK, witness_key_name
from security.signing import IdentityMismatch

from . import commands, registry
from .metrics import Metrics

READINGS = "readings"
COMMAND_RESULTS = "command_results"

# The wire names (security.contract); the coordinator's policy binds each agent task id
# to its signer before the task reaches the Ingestor (security.policy.IdBoundToSigner).
INGEST, COMMAND_RESULT, HEARTBEAT = INGEST_TASK, COMMAND_RESULT_TASK, HEARTBEAT_TASK
COSIGN = WITNESS_COSIGN_TASK
MAX_COSIGN_BYTES = 2048  # agent id, size, a vkey and one signature line: a few hundred bytes


class Signer(Protocol):
    """What the signing layer tells a task about who signed it (security.signing.SignerInfo)."""

    agent_id: str
    fingerprint: str
    envelope_digest: str
    envelope: bytes
    certificate_pem: str


@dataclass
class TaskContext:
    task_id: str
    task_name: str
    signer: Signer
    received_at: float
    cert_not_after: float | None = None


class Refused(Exception):
    """The task is authentic but its content is not acceptable; journaled as REJECTED."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def canonical_digest(value: Any, salt: bytes = b"") -> str:
    """SHA-256 hex of `salt || canonical JSON of value`.

    Why a salt for the args digest: the digest is a log leaf forever, while the reading
    may have to be erased; with a random per-record salt (kept next to the raw data and
    erased with it) nobody can recover an erased value by hashing candidates.
    """
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    return hashlib.sha256(salt + data).hexdigest()


ARGS_SALT_BYTES = 16


def ensure_schema(db: sqlite_utils.Database) -> None:
    names = set(db.table_names())
    if READINGS not in names:
        db[READINGS].create(
            {
                "task_id": str, "agent_id": str, "sensor": str, "seq": int, "value": float,
                "unit": str, "sampled_at": float, "received_at": float,
            },
            pk="task_id",
        )
        db[READINGS].create_index(["agent_id", "seq"], unique=True)
    if COMMAND_RESULTS not in names:
        db[COMMAND_RESULTS].create(
            {
                "task_id": str, "agent_id": str, "command_task_id": str, "command": str,
                "status": str, "result": str, "finished_at": float, "received_at": float, "args_digest": str,
            },
            pk="task_id",
        )
    elif "args_digest" not in db[COMMAND_RESULTS].columns_dict:  # journals from before commands were recorded
        db[COMMAND_RESULTS].add_column("args_digest", str)
    commands.ensure_schema(db.conn)
    registry.ensure_schema(db)


def first_command_result(conn: sqlite3.Connection, command_task_id: str,
                         agent_id: str) -> tuple[str, str, float, float] | None:
    """(status, result JSON, finished_at, received_at) of the first result `agent_id` reported
    for the command, or None (also while no result table exists)."""
    try:
        return conn.execute(
            f"SELECT status, result, finished_at, received_at FROM {COMMAND_RESULTS} "
            "WHERE command_task_id = ? AND agent_id = ? ORDER BY received_at LIMIT 1",
            (command_task_id, agent_id)).fetchone()
    except sqlite3.OperationalError:
        return None


def reading_seq_ranges(conn: sqlite3.Connection, agent_id: str) -> list[list[int]]:
    """The agent's stored seqs as [first, last] ranges in order ([] while no readings table exists)."""
    try:
        rows = conn.execute(
            f"SELECT MIN(seq), MAX(seq) FROM (SELECT seq, seq - ROW_NUMBER() OVER (ORDER BY seq) AS g "
            f"FROM {READINGS} WHERE agent_id = ?) GROUP BY g ORDER BY 1", (agent_id,)
        ).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    return [[int(a), int(b)] for a, b in rows]


def erase_payloads(db: sqlite_utils.Database, agent_id: str, before: float | None) -> tuple[int, int]:
    """Inside the caller's transaction: delete the agent's readings and command results
    (received before `before`, if given). Returns (readings, command results) deleted."""
    cond, params = "agent_id = ?", list[Any]([agent_id])
    if before is not None:
        cond += " AND received_at < ?"
        params.append(before)
    readings = db.conn.execute(f"DELETE FROM {READINGS} WHERE {cond}", params).rowcount
    results = db.conn.execute(f"DELETE FROM {COMMAND_RESULTS} WHERE {cond}", params).rowcount
    return readings, results


_INSERT_READING = (f"INSERT INTO {READINGS} (task_id, agent_id, sensor, seq, value, unit, sampled_at, received_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


class _Heard:
    """The registry updates of a batch's readings, one per agent: `registry.touch` costs
    the same for 1 reading as for 100, and the batch commits them together anyway."""

    def __init__(self) -> None:
        self.agents: dict[str, tuple[int, int, dict[str, Any]]] = {}

    def reading(self, agent: str, seq: int, common: dict[str, Any]) -> None:
        count, top, _ = self.agents.get(agent, (0, seq, common))
        self.agents[agent] = (count + 1, max(top, seq), common)

    def flush(self, db: sqlite_utils.Database) -> None:
        registry.touch_readings(db, [(agent, count, top, common) for agent, (count, top, common) in self.agents.items()])
        self.agents.clear()


def _check_reading(reading: Any) -> dict[str, Any]:
    if not isinstance(reading, dict):
        raise Refused("bad_payload", "reading must be an object")
    spec = {"agent_id": str, "sensor": str, "seq": int, "value": (int, float), "unit": str, "sampled_at": (int, float)}
    for key, typ in spec.items():
        value = reading.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise Refused("bad_payload", f"reading.{key} is missing or not {typ}")
    if not math.isfinite(float(reading["value"])) or not math.isfinite(float(reading["sampled_at"])):
        raise Refused("bad_payload", "reading value/sampled_at must be finite")
    return reading


DEVICE_STATUSES = ("SUCCESS", "FAILURE")


def _check_command_result(db: sqlite_utils.Database, agent_id: str, result: Any) -> str:
    """The device's reported status, if `result` answers a command sent to `agent_id`."""
    if not isinstance(result, dict) or not isinstance(result.get("command_task_id"), str):
        raise Refused("bad_payload", "command result must be an object with a command_task_id")
    sent = commands.lookup(db.conn, agent_id, result["command_task_id"])
    if sent is None:
        raise Refused("unknown_command", f"no command {result['command_task_id']} was sent to {agent_id!r}")
    if result.get("command") != sent.command:
        raise Refused("unknown_command", f"command {result['command_task_id']} sent to {agent_id!r} was "
                                         f"{sent.command}, not {result.get('command')!r}")
    if result.get("status") not in DEVICE_STATUSES:
        raise Refused("bad_payload", f"command status must be one of {', '.join(DEVICE_STATUSES)}")
    return str(result["status"])


def _check_cosignature(db: sqlite_utils.Database, agent_id: str, payload: Any) -> tuple[int, str, str]:
    """(size, vkey, signature line) of an agent's witness cosignature that verifies over a
    checkpoint this journal signed; Refused otherwise (never stored, journaled REJECTED)."""
    if not isinstance(payload, dict) or len(json.dumps(payload, default=str)) > MAX_COSIGN_BYTES:
        raise Refused("bad_payload", f"cosignature must be an object of at most {MAX_COSIGN_BYTES} bytes")
    size, vkey, line = payload.get("size"), payload.get("witness_key"), payload.get("cosignature")
    if not isinstance(size, int) or isinstance(size, bool) or not isinstance(vkey, str) or not isinstance(line, str):
        raise Refused("bad_payload", "cosignature needs size (int), witness_key (vkey) and cosignature (note line)")
    row = db.execute("SELECT note FROM tlog_checkpoint WHERE size = ?", [size]).fetchone()
    if row is None:
        raise Refused("unknown_checkpoint", f"{agent_id!r} cosigned a checkpoint of size {size} this log never signed")
    try:
        verifier = CosignatureV1Verifier.from_vkey(vkey)
        if verifier.name != witness_key_name(agent_id):
            raise Refused("cosignature_invalid", f"witness key name {verifier.name!r} is not "
                                                 f"{witness_key_name(agent_id)!r} (the signer's)")
        open_note(with_cosignatures(row[0], [line]), [verifier])
    except TlogError as exc:
        raise Refused("cosignature_invalid", f"cosignature by {agent_id!r} of size {size}: {exc}") from None
    return size, vkey, line.rstrip("\n") + "\n"


class Ingestor:
    """Runs edge.ingest / edge.command_result / edge.heartbeat against the journal."""

    def __init__(self, journal: Journal, metrics: Metrics,
                 on_reading: Callable[[str, int], None] | None = None) -> None:
        self.journal = journal
        self.metrics = metrics
        # Told (agent_id, seq) once a reading is durably journaled, new or duplicate:
        # the receipt sender (coordinator/receipts.py) confirms it to the agent.
        self.on_reading = on_reading
        with journal.transaction() as db:
            ensure_schema(db)

    def run(self, ctx: TaskContext, payload: Any) -> dict[str, Any]:
        """Execute one task; returns {"status", "duplicate", ...}. Never raises Refused."""
        outcome = self.run_batch([(ctx, payload)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def run_batch(self, items: Sequence[tuple[TaskContext, Any]],
                  around: Callable[[TaskContext], AbstractContextManager[Any]] | None = None,
                  ) -> list[dict[str, Any] | Exception]:
        """Execute many tasks in ONE journal transaction (group commit); one outcome per item.

        An outcome is the task's result ({"status", "duplicate", ...}) or, for a task whose
        own writes failed with something other than SQLite (a bug), that exception: its
        savepoint is rolled back and the others commit. Refusals (bad payload, identity,
        duplicate seq) are results (REJECTED), journaled like today. A sqlite3.Error rolls
        the whole batch back and propagates: the caller puts every message back unacked.
        Receipts (`on_reading`) and metrics are told only after the commit. `around(ctx)`
        wraps each task's checks (the worker makes it Celery's current task there, so a
        refusal is quarantined under its id).
        """
        prepared = []
        for ctx, payload in items:
            with around(ctx) if around is not None else nullcontext():
                prepared.append(self._prepare(ctx, payload))
        outcomes: list[tuple[dict[str, Any], bool] | Exception] = []
        heard = _Heard()
        with self.journal.transaction() as db:
            for (ctx, payload), checked in zip(items, prepared, strict=True):
                if ctx.task_name != INGEST:
                    heard.flush(db)  # the registry sees the batch's events in order (last_task)
                try:
                    with self.journal.transaction():  # a savepoint: one task's bug spares the batch
                        outcomes.append(self._journal(db, ctx, payload, *checked, heard))
                except sqlite3.Error:
                    raise
                except Exception as exc:  # noqa: BLE001 - handed back for this task alone
                    outcomes.append(exc)
            heard.flush(db)
        # committed: from here on every reading survives a crash, so it may be confirmed
        return [outcome if isinstance(outcome, Exception) else self._after(ctx, payload, *outcome)
                for (ctx, payload), outcome in zip(items, outcomes, strict=True)]

    def _prepare(self, ctx: TaskContext, payload: Any) -> tuple[float, str, str, str]:
        """Checks that need no write: (started, status, reason, detail)."""
        self.metrics.inc("edgeledger_tasks_received_total", task=ctx.task_name)
        started = time.time()
        claimed = payload.get("agent_id") if isinstance(payload, dict) else None
        status, reason, detail = "SUCCESS", "", ""
        try:
            try:
                ensure_bound(ctx.signer, str(claimed))  # type: ignore[arg-type]  # records + quarantines refusals
            except IdentityMismatch as exc:
                raise Refused("identity_mismatch", exc.detail) from None
            if ctx.task_name == INGEST:
                _check_reading(payload)
            elif ctx.task_name == COMMAND_RESULT:  # journaled with the device's status (FAILURE too)
                status = _check_command_result(self.journal.db, ctx.signer.agent_id, payload)
            elif ctx.task_name == COSIGN:
                _check_cosignature(self.journal.db, ctx.signer.agent_id, payload)
        except Refused as exc:
            status, reason, detail = "REJECTED", exc.reason, exc.detail
        return started, status, reason, detail

    def _journal(self, db: sqlite_utils.Database, ctx: TaskContext, payload: Any, started: float,
                 status: str, reason: str, detail: str, heard: _Heard) -> tuple[dict[str, Any], bool]:
        """Inside the batch transaction: duplicate checks, the record, the stored payload.
        Returns (result, inserted); a task id already journaled inserts nothing."""
        if status == "SUCCESS" and ctx.task_name == INGEST and self._seq_taken(db, ctx, payload):
            status, reason = "REJECTED", "duplicate_seq"
            detail = f"reading seq {payload['seq']} of {ctx.signer.agent_id} is already stored under another task id"
        result: dict[str, Any] = {"status": status}
        if reason:
            result.update(reason=reason, detail=detail)
        salt = os.urandom(ARGS_SALT_BYTES)
        record = ExecutionRecord(
            task_id=ctx.task_id,
            task_name=ctx.task_name,
            agent_id=ctx.signer.agent_id,
            signer_fingerprint=ctx.signer.fingerprint,
            args_digest=canonical_digest(payload, salt),
            result_digest=canonical_digest(result),
            status=status,
            received_at=ctx.received_at,
            started_at=started,
            finished_at=time.time(),
            envelope_digest=ctx.signer.envelope_digest,
        )
        inserted = self.journal.append(
            record, db=db, envelope=ctx.signer.envelope, certificate_pem=ctx.signer.certificate_pem, salt=salt
        )
        if inserted and status != "REJECTED":
            self._apply(db, ctx, payload, heard)
        return result, inserted

    def _after(self, ctx: TaskContext, payload: Any, result: dict[str, Any], inserted: bool) -> dict[str, Any]:
        """After the commit: the receipt book and the metrics."""
        status = result["status"]
        if status == "SUCCESS" and ctx.task_name == INGEST and self.on_reading is not None:
            self.on_reading(ctx.signer.agent_id, int(payload["seq"]))
        if not inserted:
            self.metrics.inc("edgeledger_tasks_duplicate_total", task=ctx.task_name)
            return {**result, "duplicate": True}
        self.metrics.observe("edgeledger_ingest_latency_seconds", max(0.0, time.time() - ctx.received_at),
                             task=ctx.task_name)
        if status != "REJECTED":
            self.metrics.inc("edgeledger_tasks_executed_total", task=ctx.task_name)
        else:
            self.metrics.inc("edgeledger_tasks_refused_total", reason=result["reason"])
        return {**result, "duplicate": False}

    @staticmethod
    def _seq_taken(db: sqlite_utils.Database, ctx: TaskContext, payload: dict[str, Any]) -> bool:
        row = db.execute(
            f"SELECT task_id FROM {READINGS} WHERE agent_id = ? AND seq = ?", [ctx.signer.agent_id, int(payload["seq"])]
        ).fetchone()
        return row is not None and row[0] != ctx.task_id

    def _apply(self, db: sqlite_utils.Database, ctx: TaskContext, payload: dict[str, Any], heard: _Heard) -> None:
        agent = ctx.signer.agent_id
        common = dict(task=ctx.task_name, fingerprint=ctx.signer.fingerprint, cert_not_after=ctx.cert_not_after)
        if ctx.task_name == INGEST:
            db.conn.execute(_INSERT_READING, (
                ctx.task_id, agent, payload["sensor"], int(payload["seq"]), float(payload["value"]),
                payload["unit"], float(payload["sampled_at"]), ctx.received_at))
            heard.reading(agent, int(payload["seq"]), common)
        elif ctx.task_name == COMMAND_RESULT:
            sent = commands.lookup(db.conn, agent, str(payload.get("command_task_id")))
            db[COMMAND_RESULTS].insert(
                {
                    "task_id": ctx.task_id, "agent_id": agent,
                    "command_task_id": str(payload.get("command_task_id")), "command": str(payload.get("command")),
                    "status": str(payload.get("status")), "result": json.dumps(payload.get("result"), default=str),
                    "finished_at": float(payload.get("finished_at") or 0.0), "received_at": ctx.received_at,
                    "args_digest": sent.args_digest if sent else None,
                }
            )
            registry.touch(db, agent, **common)
        elif ctx.task_name == HEARTBEAT:
            registry.touch(db, agent, heartbeat=payload, **common)
        elif ctx.task_name == COSIGN:
            size, vkey, line = _check_cosignature(db, agent, payload)
            self.journal.add_cosignature(db, size, agent, vkey, line, ctx.task_id)
