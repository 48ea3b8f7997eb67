"""Replay guard: a task (id, retry number) is accepted once, and only while fresh.

Why: a captured message re-sent later must not run again. The guard persists in
SQLite so a restart does not forget, and prunes entries once the freshness window
alone would refuse them. A broker redelivery after a worker crash carries the same
envelope and is let through once, but only when the acceptor was a previous process
and the task never finished.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from .signing import SignatureRefused


class ReplayGuard:
    def __init__(self, path: Path | str, max_age_seconds: float = 300.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_age = float(max_age_seconds)
        self.boot_id = f"{os.getpid()}-{uuid.uuid4().hex}"
        self._local = threading.local()
        self._last_prune = 0.0
        conn = self._conn()
        with conn:
            conn.execute(
                "create table if not exists seen ("
                " key text primary key, envelope_digest text not null, signer text,"
                " sent_at real not null, accepted_at real not null, boot_id text not null,"
                " done integer not null default 0)"
            )
            conn.execute("create index if not exists seen_sent_at on seen (sent_at)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            conn.execute("pragma journal_mode=wal")
            conn.execute("pragma synchronous=normal")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def check_fresh(self, sent_at: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if abs(now - sent_at) > self.max_age:
            raise SignatureRefused(
                "stale", f"message sent at {sent_at:.3f} is {now - sent_at:+.1f}s from now; limit ±{self.max_age:g}s"
            )

    def accept(self, key: str, envelope_digest: str, sent_at: float, signer: str) -> None:
        """Record `key` as accepted or raise SignatureRefused('replay')."""
        now = time.time()
        self.check_fresh(sent_at, now)
        conn = self._conn()
        # Fast path: one autocommit statement for a key never seen.
        cur = conn.execute(
            "insert into seen (key, envelope_digest, signer, sent_at, accepted_at, boot_id) values (?,?,?,?,?,?)"
            " on conflict(key) do nothing",
            (key, envelope_digest, signer, sent_at, now, self.boot_id),
        )
        if cur.rowcount == 1:
            if now - self._last_prune > 60:
                self.prune(now)
            return
        conn.execute("begin immediate")
        try:
            row = conn.execute("select envelope_digest, boot_id, done from seen where key = ?", (key,)).fetchone()
            if row is None:  # pruned in between: accept
                conn.execute(
                    "insert into seen (key, envelope_digest, signer, sent_at, accepted_at, boot_id) values (?,?,?,?,?,?)",
                    (key, envelope_digest, signer, sent_at, now, self.boot_id),
                )
            elif row[0] == envelope_digest and row[1] != self.boot_id and not row[2]:
                # Redelivery of an unfinished task accepted by a previous process.
                conn.execute("update seen set boot_id = ?, accepted_at = ? where key = ?", (self.boot_id, now, key))
            else:
                raise SignatureRefused("replay", f"task {key} was already accepted at {_fmt(conn, key)}")
            conn.execute("commit")
        except BaseException:
            conn.execute("rollback")
            raise
        if now - self._last_prune > 60:
            self.prune(now)

    def mark_done(self, key: str) -> None:
        self._conn().execute("update seen set done = 1 where key = ?", (key,))

    def prune(self, now: float | None = None) -> int:
        """Forget entries the freshness window already refuses (keeps the file small)."""
        now = time.time() if now is None else now
        self._last_prune = now
        cur = self._conn().execute("delete from seen where sent_at < ?", (now - 2 * self.max_age - 60,))
        return cur.rowcount

    def seen(self, key: str) -> bool:
        return self._conn().execute("select 1 from seen where key = ?", (key,)).fetchone() is not None


def _fmt(conn: sqlite3.Connection, key: str) -> str:
    row = conn.execute("select accepted_at from seen where key = ?", (key,)).fetchone()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row[0])) if row else "?"
