"""Opening the project's SQLite files the same way everywhere (stdlib only).

Why one module: the journal, the outbox and every read-only view (metrics scrapes, the
demo, `agents`) open SQLite files from several threads and processes at once. Two
things are easy to get wrong there and were, in three places: switching a fresh file
to WAL races with another opener, and a read-only view must never create or change a
file. The agent imports this too, so it stays free of third-party imports.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def enable_wal(db: sqlite3.Connection, path: Path | str, timeout: float = 30.0) -> None:
    """Switch the file to WAL, waiting for other connections that are doing the same.

    Why a loop: while another connection holds the lock to change the journal mode (two
    threads opening a fresh file at once), SQLite answers `PRAGMA journal_mode=WAL` with
    SQLITE_BUSY at once, without calling the busy handler that the connection's timeout
    installs. Once any connection has switched, the mode is persistent and the read is enough.
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            mode = str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode == "wal" or str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower() == "wal":
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        if time.monotonic() >= deadline:
            raise sqlite3.OperationalError(
                f"{path} stays locked by another process: stop it, or wait for it to finish"
            )
        time.sleep(delay)  # a lock wait, not a retry schedule; not kombu_mqtt.backoff: this module stays stdlib-only
        delay = min(delay * 2, 0.05)


def connect_read_only(path: Path | str, timeout: float = 10.0, **kwargs: Any) -> sqlite3.Connection:
    """A read-only connection (mode=ro: never creates the file, never writes) that the caller keeps
    (e.g. one per thread); `kwargs` go to sqlite3.connect (isolation_level, check_same_thread)."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout, **kwargs)


@contextmanager
def read_only(path: Path | str, timeout: float = 10.0) -> Iterator[sqlite3.Connection]:
    """A read-only connection (`connect_read_only`), closed after use."""
    conn = connect_read_only(path, timeout)
    try:
        yield conn
    finally:
        conn.close()


def unreadable_reason(path: Path | str) -> str | None:
    """Why `path` is not a readable SQLite database (corrupt, truncated, not SQLite), or None.

    Why: a process that opens a damaged file finds out deep inside a component, as a
    traceback; under systemd that becomes a crash loop. Tools check first and exit once
    with one line naming the file (an absent file is fine: it is created when needed)."""
    if not Path(path).exists():
        return None
    try:
        with read_only(path) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            row = conn.execute("PRAGMA quick_check(1)").fetchone()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    if row is None or row[0] != "ok":
        return str(row[0]) if row else "quick_check returned nothing"
    return None
