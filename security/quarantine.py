"""Quarantine: refused messages are kept, raw, with the reason they were refused.

Why: a refused message must never vanish (acked away with a log line nobody reads);
an operator or auditor can inspect, export, or re-verify it later.
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

import sqlite_utils

TABLE = "quarantine"


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
            db[TABLE].create(
                {
                    "id": int, "received_at": float, "reason": str, "detail": str,
                    "signer": str, "task_id": str, "task_name": str, "headers": str, "body": bytes,
                },
                pk="id",
                if_not_exists=True,
            )
            db[TABLE].create_index(["reason"], if_not_exists=True)

    def _db(self) -> "_Conn":
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
        row = {
            "received_at": time.time(), "reason": reason, "detail": detail[:2000],
            "signer": signer, "task_id": task_id, "task_name": task_name,
            "headers": json.dumps(headers or {}, default=str, sort_keys=True), "body": raw,
        }
        with self._lock, self._db() as db:
            return db[TABLE].insert(row).last_pk

    def rows(self, reason: str | None = None) -> list[QuarantinedMessage]:
        with self._db() as db:
            where, args = ("reason = ?", [reason]) if reason else (None, None)
            return [
                QuarantinedMessage(
                    id=r["id"], received_at=r["received_at"], reason=r["reason"], detail=r["detail"],
                    signer=r["signer"], task_id=r["task_id"], task_name=r["task_name"],
                    headers=json.loads(r["headers"] or "{}"), body=bytes(r["body"] or b""),
                )
                for r in db[TABLE].rows_where(where, args, order_by="id")
            ]

    def count(self, reason: str | None = None) -> int:
        with self._db() as db:
            if reason:
                return db.execute(f"select count(*) from {TABLE} where reason = ?", [reason]).fetchone()[0]
            return db[TABLE].count


class _Conn:
    """A per-thread connection; each `with` block is one committed transaction."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(str(path), timeout=30)
        self.conn.execute("pragma journal_mode=wal")
        self.conn.execute("pragma synchronous=normal")
        self.db = sqlite_utils.Database(self.conn)

    def __enter__(self) -> sqlite_utils.Database:
        return self.db

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.conn.commit()
        else:
            self.conn.rollback()
