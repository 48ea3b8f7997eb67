"""Store and forward: every message the agent sends is a row here first.

Why: a device loses its network often. A reading gets its sequence number and its
task id when it is stored (in one SQLite transaction). After the broker's PUBACK the
row is only marked published (`sent_at`): it is deleted when the coordinator's signed
receipt says it is journaled (`confirm`), because the broker may still lose it (it
persists about once a second) and the journal may refuse it. A reading unconfirmed
`resend_after` seconds after its publish is published again under the same task id;
the coordinator deduplicates it. Each further re-send of the same row waits twice as
long (at most RESEND_BACKOFF_MAX x resend_after): a coordinator that is only behind
would otherwise get every unconfirmed reading of the fleet again each `resend_after`
(measured with 1,000 simulated agents: 103,040 re-sends in 300 s), deepening its backlog. Other messages (command results, heartbeats) leave
on PUBACK as before (`mark_sent`).

Bound: at most `max_rows` rows. Beyond it the OLDEST rows are dropped (the newest
data is the most useful after a long outage), counted in `dropped` (reported in the
heartbeat) and logged once per episode; the gap in `seq` shows the coordinator
exactly what was lost.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.sqlite_files import enable_wal

# Task ids come from the wire contract: the coordinator refuses any other (id_not_bound).
from security.contract import INGEST_TASK, reading_task_id

from .sensors.base import Sample

log = logging.getLogger("edge.agent.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_name TEXT NOT NULL,
    task_id TEXT NOT NULL UNIQUE,
    kwargs TEXT NOT NULL,
    created_at REAL NOT NULL,
    seq INTEGER,
    sent_at REAL,
    publishes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Outboxes written before end-to-end receipts: add the columns, fill seq from the reading.
MIGRATIONS = (
    ("seq", "ALTER TABLE outbox ADD COLUMN seq INTEGER",
     "UPDATE outbox SET seq = json_extract(kwargs, '$.reading.seq') WHERE task_name = 'edge.ingest'"),
    ("sent_at", "ALTER TABLE outbox ADD COLUMN sent_at REAL", None),
    ("publishes", "ALTER TABLE outbox ADD COLUMN publishes INTEGER NOT NULL DEFAULT 0", None),
)

RESEND_BACKOFF_MAX = 16  # a row's wait doubles per re-send, up to this many resend_after
_MAX_SHIFT = RESEND_BACKOFF_MAX.bit_length() - 1
# When a published row is due again: resend_after x 2^(publishes - 1), capped (SQL, per row).
_DUE_AT = f"(sent_at + ? * (1 << MIN(MAX(publishes - 1, 0), {_MAX_SHIFT})))"


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

    def __init__(self, path: Path, agent_id: str, max_rows: int = 100_000, resend_after: float = 60.0) -> None:
        self.path = Path(path)
        self.agent_id = agent_id
        self.max_rows = max_rows
        self.resend_after = resend_after
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        enable_wal(self.db, self.path, BUSY_TIMEOUT)
        self.db.execute("PRAGMA synchronous=FULL")  # a stored reading survives power loss
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(outbox)")}
        for column, alter, fill in MIGRATIONS:
            if column not in columns:
                self.db.execute(alter)
                if fill:
                    self.db.execute(fill)
        self.db.execute("CREATE INDEX IF NOT EXISTS outbox_seq ON outbox(seq)")

    def close(self) -> None:
        self.db.close()

    # -- meta ----------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))

    def delete_meta(self, key: str) -> None:
        self.db.execute("DELETE FROM meta WHERE key = ?", (key,))

    def _bump(self, key: str, by: int = 1) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + ?",
            (key, str(by), by),
        )

    # -- writing -------------------------------------------------------
    def _insert(self, task_name: str, task_id: str, kwargs: dict[str, Any], seq: int | None = None) -> bool:
        """Insert inside the caller's transaction; False when the task id is already stored."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO outbox(task_name, task_id, kwargs, created_at, seq) VALUES (?, ?, ?, ?, ?)",
            (task_name, task_id, json.dumps(kwargs, separators=(",", ":"), sort_keys=True), time.time(), seq),
        )
        if cur.rowcount == 0:
            return False
        count = self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        excess = count - self.max_rows
        if excess > 0:
            self.db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (excess,))
            self._bump("dropped", excess)
            if self.get_meta("dropping", "0") == "0":  # once per episode: until the outbox drains again
                self.set_meta("dropping", "1")
                log.warning("outbox %s is full (%d rows, outbox_max): dropping the oldest readings; the count is "
                            "reported in the next heartbeat. Fix: restore the broker connection or raise outbox_max",
                            self.path, self.max_rows)
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
                self._insert(INGEST_TASK, reading_task_id(self.agent_id, seq), {"reading": reading}, seq)
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
    def pending(self, limit: int = 200, now: float | None = None) -> list[OutboxItem]:
        """Due to be published, oldest first (the send order is the store order): never
        published, or published `resend_after` ago without a receipt. While receipts keep
        coming (the coordinator is alive, maybe just behind), only readings below the
        highest confirmed seq are re-sent (those were lost on the way): re-sending all
        of a busy coordinator's backlog would only deepen it."""
        now = time.time() if now is None else now
        quiet = float(self.get_meta("last_receipt_at", "0")) <= now - self.resend_after
        below = int(self.get_meta("max_confirmed_seq", "0"))
        rows = self.db.execute(
            "SELECT id, task_name, task_id, kwargs, created_at FROM outbox WHERE sent_at IS NULL OR "
            f"({_DUE_AT} <= ? AND (? OR seq < ?)) ORDER BY id LIMIT ?", (self.resend_after, now, quiet, below, limit)
        ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    def mark_sent(self, item_id: int, awaits_receipt: bool = False) -> None:
        """Called only after the broker acknowledged the publish. A reading that awaits a
        receipt is only marked published; anything else is done and deleted."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if awaits_receipt:
                cur = self.db.execute("UPDATE outbox SET sent_at = ?, publishes = publishes + 1 WHERE id = ?",
                                      (time.time(), item_id))
            else:
                cur = self.db.execute("DELETE FROM outbox WHERE id = ?", (item_id,))
            if cur.rowcount:
                self._bump("sent")
            self.set_meta("last_flush_at", repr(time.time()))

    def confirm(self, upto: int, held: list[tuple[int, int]] = ()) -> int:
        """Delete the readings the coordinator's receipt says it journaled; returns how many."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            n = self.db.execute("DELETE FROM outbox WHERE task_name = ? AND seq <= ?", (INGEST_TASK, upto)).rowcount
            for lo, hi in held:
                n += self.db.execute("DELETE FROM outbox WHERE task_name = ? AND seq BETWEEN ? AND ?",
                                     (INGEST_TASK, lo, hi)).rowcount
            if n:
                self._bump("confirmed", n)
            top = max([upto, *(hi for _, hi in held)])
            self.set_meta("max_confirmed_seq", max(top, int(self.get_meta("max_confirmed_seq", "0"))))
            self.set_meta("last_receipt_at", repr(time.time()))
            if self.get_meta("dropping", "0") == "1" and self._count() < self.max_rows:
                self.set_meta("dropping", "0")  # the episode is over: log the next one again
        return n

    def readings(self, seqs: list[int]) -> dict[int, dict[str, Any]]:
        """The stored readings with these seqs (the ones still in the outbox), by seq."""
        out: dict[int, dict[str, Any]] = {}
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            rows = self.db.execute(f"SELECT seq, kwargs FROM outbox WHERE task_name = ? AND seq IN "
                                   f"({','.join('?' * len(chunk))})", (INGEST_TASK, *chunk))
            for seq, kwargs in rows:
                reading = json.loads(kwargs).get("reading")
                if isinstance(reading, dict):
                    out[int(seq)] = reading
        return out

    def stored_seqs(self, upto: int, held: list[tuple[int, int]] = ()) -> list[int]:
        """Seqs of readings in the outbox that `upto`/`held` cover."""
        found = [r[0] for r in self.db.execute("SELECT seq FROM outbox WHERE task_name = ? AND seq <= ?",
                                               (INGEST_TASK, upto))]
        for lo, hi in held:
            found += [r[0] for r in self.db.execute("SELECT seq FROM outbox WHERE task_name = ? AND seq BETWEEN ? AND ?",
                                                    (INGEST_TASK, lo, hi))]
        return sorted(found)

    def confirm_seqs(self, seqs: list[int], top: int) -> int:
        """Witness mode: delete only the confirmed readings whose inclusion in the log was
        proven; `top` is the highest confirmed seq (unproven ones below it are re-sent)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            n = 0
            for seq in seqs:
                n += self.db.execute("DELETE FROM outbox WHERE task_name = ? AND seq = ?", (INGEST_TASK, seq)).rowcount
            if n:
                self._bump("confirmed", n)
            self.set_meta("max_confirmed_seq", max(top, int(self.get_meta("max_confirmed_seq", "0"))))
            self.set_meta("last_receipt_at", repr(time.time()))
            if self.get_meta("dropping", "0") == "1" and self._count() < self.max_rows:
                self.set_meta("dropping", "0")
        return n

    def next_resend_at(self) -> float | None:
        """Wall-clock time the next unconfirmed reading is due again (see `pending`), None if none."""
        ra = self.resend_after
        oldest = self.db.execute(f"SELECT MIN({_DUE_AT}) FROM outbox WHERE sent_at IS NOT NULL", (ra,)).fetchone()[0]
        if oldest is None:
            return None
        below = int(self.get_meta("max_confirmed_seq", "0"))
        low = self.db.execute(f"SELECT MIN({_DUE_AT}) FROM outbox WHERE sent_at IS NOT NULL AND seq < ?",
                              (ra, below)).fetchone()[0]
        quiet_at = float(self.get_meta("last_receipt_at", "0")) + ra
        first = max(float(oldest), quiet_at)
        return first if low is None else min(first, float(low))

    def _count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def backlog(self) -> int:
        """Rows not yet published (published readings awaiting a receipt: `unconfirmed`)."""
        return self.db.execute("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").fetchone()[0]

    def unconfirmed(self) -> int:
        """Readings published but not yet confirmed journaled by the coordinator."""
        return self.db.execute("SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        last = self.get_meta("last_flush_at")
        return {
            "backlog": self.backlog(),
            "unconfirmed": self.unconfirmed(),
            "next_seq": int(self.get_meta("next_seq", "1")),
            "sent": int(self.get_meta("sent", "0")),
            "confirmed": int(self.get_meta("confirmed", "0")),
            "dropped": int(self.get_meta("dropped", "0")),
            "last_flush_at": float(last) if last else None,
        }
