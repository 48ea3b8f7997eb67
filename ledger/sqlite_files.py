"""Opening the project's SQLite files the same way everywhere (stdlib only).

Why one module: the journal, the outbox and every read-only view (metrics scrapes, the
demo, `agents`) open SQLite files from several threads and processes at once. Two
things are easy to get wrong there and were, in three places: switching a fresh file
to WAL races with another opener, and a read-only view must never create or change a
file. The agent imports this too, so it stays free of third-party imports.
"""

from __future__ import annotations

import json
import os
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


# -- start-up check: full scan only after an unclean stop -----------------------------
#
# Why not `unreadable_reason` at every start: PRAGMA quick_check reads every page, so a
# service that runs it at each start pays a cost that grows with its file (the agent's
# outbox and quarantine, the coordinator's journal), on every restart. A file that the
# last writer closed cleanly and that nobody touched since cannot have been damaged by
# that writer; what can still happen to it (replaced, truncated, overwritten by another
# tool) changes its size, mtime or inode, or breaks its header or schema, which the cheap
# check reads. So: the writer records the file's identity when it stops cleanly
# (`mark_clean_stop`), and `unreadable_at_start` consumes that record; with a matching
# record it checks the header (in-header page count against the file size) and the
# schema, without one (first start, crash, kill -9, power loss, a file changed while
# stopped) it runs the full quick_check as before. What the cheap path cannot see is a
# page rotting in place on the medium while the service is stopped; SQLite reports that
# when the page is read, and `edge-agent status` / `edge-coordinator agents` still run
# the full check.

CLEAN_STOP_SUFFIX = ".clean-stop"
_HEADER = b"SQLite format 3\x00"


def clean_stop_marker(path: Path | str) -> Path:
    """The record `mark_clean_stop` leaves next to `path`."""
    return Path(f"{path}{CLEAN_STOP_SUFFIX}")


def _identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


def _wal_empty(path: Path) -> bool:
    """No write-ahead log with frames next to `path` (absent or zero bytes)."""
    try:
        return Path(f"{path}-wal").stat().st_size == 0
    except FileNotFoundError:
        return True


def _checkpoint(path: Path, timeout: float) -> None:
    """Move the write-ahead log into the file and empty it, if no reader holds it back."""
    try:
        conn = sqlite3.connect(path, timeout=timeout)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        pass  # the log stays; no record is written


def mark_clean_stop(path: Path | str, timeout: float = 1.0) -> bool:
    """Record that the writer of `path` stopped cleanly; call once its work has stopped.

    Checkpoints the write-ahead log first (a connection left open but idle, such as a
    per-thread one, keeps its committed frames there). Returns False and records nothing,
    so the next start runs the full check, when the file is absent or the log cannot
    be emptied (another process is reading or writing it)."""
    p = Path(path)
    marker = clean_stop_marker(p)
    if p.exists() and not _wal_empty(p):
        _checkpoint(p, timeout)
    if not p.exists() or not _wal_empty(p):
        marker.unlink(missing_ok=True)
        return False
    tmp = marker.with_name(f"{marker.name}.tmp")
    tmp.write_text(json.dumps(_identity(p), sort_keys=True))
    os.replace(tmp, marker)
    return True


def _recorded(marker: Path) -> dict[str, int] | None:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def header_reason(path: Path | str) -> str | None:
    """Why the 100-byte header of `path` is not a sound SQLite header for its size, or None.

    Reads the page size and the in-header page count (valid when the version-valid-for
    number equals the change counter, always so since SQLite 3.7.0): a file shorter than
    page size x page count was truncated. Only meaningful without a write-ahead log with
    frames (pages may then live in the log)."""
    p = Path(path)
    with open(p, "rb") as fh:
        head = fh.read(100)
    if len(head) < 100 or not head.startswith(_HEADER):
        return "file is not a database (no SQLite header)"
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"invalid page size {page_size} in the header"
    pages = int.from_bytes(head[28:32], "big")
    if pages and head[24:28] == head[92:96] and p.stat().st_size < pages * page_size:
        return f"file is truncated ({p.stat().st_size} bytes, header says {pages} pages of {page_size})"
    return None


def unreadable_at_start(path: Path | str) -> str | None:
    """Like `unreadable_reason`, for the start of the file's writer (see the note above).

    Consumes the clean-stop record of `path`: if this run ends uncleanly, the next start
    runs the full check."""
    p = Path(path)
    marker = clean_stop_marker(p)
    recorded = _recorded(marker)
    marker.unlink(missing_ok=True)
    if not p.exists():
        return None
    if recorded is None or recorded != _identity(p) or not _wal_empty(p):
        return unreadable_reason(p)
    try:
        reason = header_reason(p)
        if reason is None:
            with read_only(p) as conn:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except (OSError, sqlite3.DatabaseError) as exc:
        return str(exc)
    return reason
