"""Store and forward: every message the agent sends is a row here first.

Why: a device loses its network often. A reading gets its sequence number and its
task id when it is stored (in one SQLite transaction), and the row is deleted only
after the broker acknowledged the publish (PUBACK). A crash between the PUBACK and
the delete re-sends the same task id, which the coordinator deduplicates; nothing
is ever lost short of the size bound.

Bound: at most `max_rows` rows. Beyond it the OLDEST rows are dropped (the newest
data is the most useful after a long outage) and counted in `dropped`; the gap in
`seq` shows the coordinator exactly what was lost.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.sqlite_files import enable_wal
# Task ids come from the wire contract: the coordinator refuses any other (id_not_bound).
from security.contract import INGEST_TASK, reading_task_id

from .sensors.base import Sample

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_name TEXT NOT NULL,
    task_id TEXT NOT NULL UNIQUE,
    kwargs TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


BUSY_TIMEOUT = 30.0  # seconds a writer waits for another thread's transaction


@dataclass(frozen=True)
class OutboxItem:
    id: int
    task_name: str
    task_id: str
    kwargs: dict[str, Any]
    created_at: float


class Outbox:
    """One SQLite file; open one Outbox per thread (sqlite3 connections are per thread)."""

    def __init__(self, path: Path, agent_id: str, max_rows: int = 100_000) -> None:
        self.path = Path(path)
        self.agent_id = agent_id
        self.max_rows = max_rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        enable_wal(self.db, self.path, BUSY_TIMEOUT)
        self.db.execute("PRAGMA synchronous=FULL")  # a stored reading survives power loss
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- meta ----------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))

    def _bump(self, key: str, by: int = 1) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + ?",
            (key, str(by), by),
        )

    # -- writing -------------------------------------------------------
    def _insert(self, task_name: str, task_id: str, kwargs: dict[str, Any]) -> bool:
        """Insert inside the caller's transaction; False when the task id is already stored."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO outbox(task_name, task_id, kwargs, created_at) VALUES (?, ?, ?, ?)",
            (task_name, task_id, json.dumps(kwargs, separators=(",", ":"), sort_keys=True), time.time()),
        )
        if cur.rowcount == 0:
            return False
        count = self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        excess = count - self.max_rows
        if excess > 0:
            self.db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (excess,))
            self._bump("dropped", excess)
        return True

    def add_samples(self, samples: list[Sample]) -> list[dict[str, Any]]:
        """Store samples as readings with consecutive seq numbers (one transaction)."""
        readings = []
        with self.db:  # BEGIN ... COMMIT
            self.db.execute("BEGIN IMMEDIATE")
            seq = int(self.get_meta("next_seq", "1"))
            for sample in samples:
                reading = {
                    "agent_id": self.agent_id,
                    "sensor": sample.sensor,
                    "seq": seq,
                    "value": float(sample.value),
                    "unit": sample.unit,
                    "sampled_at": float(sample.sampled_at),
                }
                self._insert(INGEST_TASK, reading_task_id(self.agent_id, seq), {"reading": reading})
                readings.append(reading)
                seq += 1
            self.set_meta("next_seq", seq)
        return readings

    def add_task(self, task_name: str, task_id: str, kwargs: dict[str, Any]) -> bool:
        """Store any other message (command result, heartbeat) under a caller-chosen id."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            return self._insert(task_name, task_id, kwargs)

    def replace_task(self, task_name: str, task_id: str, kwargs: dict[str, Any]) -> None:
        """Store a message that supersedes unsent ones of the same name (heartbeats:
        after an outage only the newest one is worth sending)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM outbox WHERE task_name = ?", (task_name,))
            self._insert(task_name, task_id, kwargs)

    # -- sending -------------------------------------------------------
    def pending(self, limit: int = 200) -> list[OutboxItem]:
        """Oldest first: the send order is the store order."""
        rows = self.db.execute(
            "SELECT id, task_name, task_id, kwargs, created_at FROM outbox ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    def mark_sent(self, item_id: int) -> None:
        """Called only after the broker acknowledged the publish."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute("DELETE FROM outbox WHERE id = ?", (item_id,))
            if cur.rowcount:
                self._bump("sent")
            self.set_meta("last_flush_at", repr(time.time()))

    def backlog(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        last = self.get_meta("last_flush_at")
        return {
            "backlog": self.backlog(),
            "next_seq": int(self.get_meta("next_seq", "1")),
            "sent": int(self.get_meta("sent", "0")),
            "dropped": int(self.get_meta("dropped", "0")),
            "last_flush_at": float(last) if last else None,
        }
