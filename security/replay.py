"""Replay guard: a task (signer, id, retry number) is accepted once, and only while fresh.

Why: a captured message re-sent later must not run again. The guard persists in
SQLite so a restart does not forget, and prunes an entry only once the message could
no longer be fresh: a delayed task (eta) stays fresh until eta + max_age, so its entry
is kept that long too. A broker redelivery after a worker crash carries the same
envelope and is let through once, but only when the acceptor was a previous process
and the task never finished. Callers key entries by signer + task id, so nothing one
signer sends can make another signer's ids look replayed.

Re-sends (`allow_resend`): a sender that got no end-to-end receipt signs the same task
id again, in a NEW envelope. For tasks whose consumer dedupes by id (the journal) that
is accepted once per envelope: every extra envelope digest is remembered (`resent`),
so a byte-identical copy of any of them is still refused as `replay`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
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
            columns = {row[1] for row in conn.execute("pragma table_info(seen)")}
            if "fresh_until" not in columns:  # files written before delayed tasks were kept
                conn.execute("alter table seen add column fresh_until real")
            conn.execute(
                "create table if not exists resent (envelope_digest text primary key, key text not null,"
                " fresh_until real not null)"
            )

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            conn.execute("pragma journal_mode=wal")
            conn.execute("pragma synchronous=normal")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def check_fresh(self, sent_at: float, now: float | None = None, eta: float | None = None) -> None:
        check_fresh(sent_at, self.max_age, now, eta)

    def accept(self, key: str, envelope_digest: str, sent_at: float, signer: str, eta: float | None = None,
               allow_resend: bool = False, max_age: float | None = None) -> None:
        """Record `key` as accepted or raise SignatureRefused('replay' | 'stale').

        `max_age`: a longer freshness bound for re-sendable tasks (their consumer dedupes
        by id). The entry is still kept only max_age_seconds past sending: an older copy
        that comes back after that is let through here and deduplicated by the consumer.
        """
        now = time.time()
        check_fresh(sent_at, self.max_age if max_age is None else max_age, now, eta)
        fresh_until = max(sent_at, eta or sent_at) + self.max_age
        conn = self._conn()
        # Fast path: one autocommit statement for a key never seen.
        cur = conn.execute(
            "insert into seen (key, envelope_digest, signer, sent_at, accepted_at, boot_id, fresh_until)"
            " values (?,?,?,?,?,?,?) on conflict(key) do nothing",
            (key, envelope_digest, signer, sent_at, now, self.boot_id, fresh_until),
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
                    "insert into seen (key, envelope_digest, signer, sent_at, accepted_at, boot_id, fresh_until)"
                    " values (?,?,?,?,?,?,?)",
                    (key, envelope_digest, signer, sent_at, now, self.boot_id, fresh_until),
                )
            elif row[0] == envelope_digest and row[1] != self.boot_id and not row[2]:
                # Redelivery of an unfinished task accepted by a previous process.
                conn.execute("update seen set boot_id = ?, accepted_at = ? where key = ?", (self.boot_id, now, key))
            elif allow_resend and row[0] != envelope_digest and not self._was_resent(conn, envelope_digest):
                # The signer's own re-send under the same id: the consumer dedupes it.
                conn.execute("insert into resent (envelope_digest, key, fresh_until) values (?,?,?)",
                             (envelope_digest, key, fresh_until))
            else:
                raise SignatureRefused("replay", f"task {key} was already accepted at {_fmt(conn, key)}")
            conn.execute("commit")
        except BaseException:
            conn.execute("rollback")
            raise
        if now - self._last_prune > 60:
            self.prune(now)

    @staticmethod
    def _was_resent(conn: sqlite3.Connection, envelope_digest: str) -> bool:
        return conn.execute("select 1 from resent where envelope_digest = ?", (envelope_digest,)).fetchone() is not None

    def release(self, key: str, envelope_digest: str) -> None:
        """Forget that this envelope was accepted: the consumer could not execute it and
        put it back in the broker (journal unwritable), so its redelivery must pass."""
        conn = self._conn()
        cur = conn.execute("delete from seen where key = ? and envelope_digest = ?", (key, envelope_digest))
        if cur.rowcount == 0:
            conn.execute("delete from resent where key = ? and envelope_digest = ?", (key, envelope_digest))

    def mark_done(self, key: str) -> None:
        self._conn().execute("update seen set done = 1 where key = ?", (key,))

    def mark_done_many(self, keys: Iterable[str]) -> None:
        """`mark_done` for a whole batch of executed tasks, in one transaction."""
        conn = self._conn()
        conn.execute("begin immediate")
        try:
            conn.executemany("update seen set done = 1 where key = ?", [(key,) for key in keys])
            conn.execute("commit")
        except BaseException:
            conn.execute("rollback")
            raise

    def prune(self, now: float | None = None) -> int:
        """Forget entries whose message the freshness window already refuses (keeps the
        file small); a margin of one more window absorbs clock skew between hosts."""
        now = time.time() if now is None else now
        self._last_prune = now
        conn = self._conn()
        cur = conn.execute(
            "delete from seen where coalesce(fresh_until, sent_at + ?) < ?", (self.max_age, now - self.max_age - 60)
        )
        conn.execute("delete from resent where fresh_until < ?", (now - self.max_age - 60,))
        return cur.rowcount

    def seen(self, key: str) -> bool:
        return self._conn().execute("select 1 from seen where key = ?", (key,)).fetchone() is not None


def check_fresh(sent_at: float, max_age: float, now: float | None = None, eta: float | None = None) -> None:
    """Raise SignatureRefused('stale') unless the message is fresh.

    Fresh: not sent more than `max_age` in the future, and not older than `max_age`
    measured from max(sent_at, eta): a delayed task waits for its eta legitimately and
    is fresh until eta + max_age (the eta itself is bounded by max_delay_seconds).
    """
    now = time.time() if now is None else now
    if sent_at - now > max_age:
        raise SignatureRefused("stale", f"message sent at {sent_at:.3f} is {sent_at - now:.1f}s in the future; limit {max_age:g}s")
    reference = max(sent_at, eta) if eta is not None else sent_at
    if now - reference > max_age:
        what = "its eta" if reference != sent_at else "sending"
        raise SignatureRefused(
            "stale", f"message sent at {sent_at:.3f} is {now - reference:.1f}s past {what}; limit {max_age:g}s"
        )


def _fmt(conn: sqlite3.Connection, key: str) -> str:
    row = conn.execute("select accepted_at from seen where key = ?", (key,)).fetchone()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row[0])) if row else "?"
