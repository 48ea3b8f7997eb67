"""Quarantine: refused messages are kept, raw, with the reason they were refused.

Why: a refused message must never vanish (acked away with a log line nobody reads);
an operator or auditor can inspect, export, or re-verify it later.

Plain sqlite3 on purpose: this module is on the device agent's import path, and
sqlite_utils (with click, pluggy and an entry-point scan of every installed package)
cost the agent ~3 MiB of RSS for four SQL statements. The schema is the one
sqlite_utils created before, so existing quarantine files keep working.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE = "quarantine"
_SCHEMA = (
    f"create table if not exists [{TABLE}] ([id] INTEGER PRIMARY KEY, [received_at] FLOAT, [reason] TEXT,"
    " [detail] TEXT, [signer] TEXT, [task_id] TEXT, [task_name] TEXT, [headers] TEXT, [body] BLOB)",
    f"create index if not exists [idx_{TABLE}_reason] on [{TABLE}] ([reason])",
)
_COLUMNS = ("received_at", "reason", "detail", "signer", "task_id", "task_name", "headers", "body")


@dataclass(frozen=True)
class QuarantinedMessage:
    id: int
    received_at: float
    reason: str
    detail: str
    signer: str | None
    task_id: str | None
    task_name: str | None
    headers: dict[str, Any]
    body: bytes


class Quarantine:
    """SQLite table of refused messages; safe to share between threads and processes."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._local = threading.local()
        with self._db() as db:
            for statement in _SCHEMA:
                db.execute(statement)

    def _db(self) -> _Conn:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = _Conn(self.path)
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def add(
        self,
        reason: str,
        detail: str,
        body: bytes | str | None,
        *,
        headers: dict[str, Any] | None = None,
        signer: str | None = None,
        task_id: str | None = None,
        task_name: str | None = None,
    ) -> int:
        raw = body.encode() if isinstance(body, str) else (body or b"")
        values = (
            time.time(), reason, detail[:2000], signer, task_id, task_name,
            json.dumps(headers or {}, default=str, sort_keys=True), raw,
        )
        sql = f"insert into [{TABLE}] ({', '.join(_COLUMNS)}) values ({', '.join('?' * len(_COLUMNS))})"
        with self._lock, self._db() as db:
            rowid = db.execute(sql, values).lastrowid
        assert rowid is not None  # an INSERT always has one
        return rowid

    def rows(self, reason: str | None = None) -> list[QuarantinedMessage]:
        sql = f"select id, {', '.join(_COLUMNS)} from [{TABLE}]"
        args: tuple[Any, ...] = ()
        if reason:
            sql, args = sql + " where reason = ?", (reason,)
        with self._db() as db:
            found = db.execute(sql + " order by id", args).fetchall()
        return [
            QuarantinedMessage(
                id=r[0], received_at=r[1], reason=r[2], detail=r[3], signer=r[4], task_id=r[5], task_name=r[6],
                headers=json.loads(r[7] or "{}"), body=bytes(r[8] or b""),
            )
            for r in found
        ]

    def count(self, reason: str | None = None) -> int:
        with self._db() as db:
            if reason:
                return int(db.execute(f"select count(*) from [{TABLE}] where reason = ?", (reason,)).fetchone()[0])
            return int(db.execute(f"select count(*) from [{TABLE}]").fetchone()[0])


def read_summary(path: Path | str, recent: int = 10) -> tuple[dict[str, int], list[QuarantinedMessage]]:
    """(count by reason, newest `recent` messages) without creating or locking the file.

    For status pages that must never write: a missing file or table reads as empty.
    """
    path = Path(path)
    if not path.exists():
        return {}, []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        counts = dict(conn.execute(f"select reason, count(*) from [{TABLE}] group by reason").fetchall())
        found = conn.execute(
            f"select id, {', '.join(_COLUMNS)} from [{TABLE}] order by id desc limit ?", (int(recent),)).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return {}, []
        raise
    finally:
        conn.close()
    newest = [
        QuarantinedMessage(
            id=r[0], received_at=r[1], reason=r[2], detail=r[3], signer=r[4], task_id=r[5], task_name=r[6],
            headers=json.loads(r[7] or "{}"), body=bytes(r[8] or b""),
        )
        for r in found
    ]
    return {str(k): int(v) for k, v in counts.items()}, newest


class _Conn:
    """A per-thread connection; each `with` block is one committed transaction."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(str(path), timeout=30)
        self.conn.execute("pragma journal_mode=wal")
        self.conn.execute("pragma synchronous=normal")

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.conn.commit()
        else:
            self.conn.rollback()
