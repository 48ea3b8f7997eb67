"""Read-only queries on a running coordinator's journal.

Why: the demo's progress display (and tests) read the journal while the daemon writes
it; a read-only connection that treats a not-yet-created file or table as empty never
disturbs the writer and never fails the display.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ledger.sqlite_files import read_only


def query_journal(data_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of `sql` on `data_dir`/journal.db, or [] while the file or table does not exist yet."""
    path = Path(data_dir) / "journal.db"
    if not path.exists():
        return []
    try:
        with read_only(path) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
