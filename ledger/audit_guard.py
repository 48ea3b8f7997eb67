"""What keeps `edge-audit` a pure reader with one-line errors.

Why a module of its own: the auditor must never change what it audits. `Journal(path)`
creates the file and its tables (and a missing or empty file would then look like an
empty, valid journal); `ReadOnlyJournal` opens `mode=ro`, so nothing is created or
written, and a file without the journal's table is refused. Damaged files, malformed
addresses and a closed stdout become one line and an exit code (security.exit_codes)
instead of a traceback.
"""

from __future__ import annotations

import re
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

from ledger.audit_config import AuditConfig, ConfigError
from ledger.journal import Journal, JournalReader
from ledger.sqlite_files import connect_read_only
from security import exit_codes

ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


class CorruptJournal(Exception):
    """The journal file cannot be read as SQLite (corrupt, truncated, not a database)."""


class ReadOnlyJournal(Journal):
    """A Journal on a read-only connection: no file, table or WAL switch is ever created."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            tables = JournalReader(self._conn()).tables()
        except sqlite3.DatabaseError as exc:
            raise CorruptJournal(str(exc)) from None
        if "executions" not in tables:
            raise ConfigError(f"{self.path} is not an edgeledger journal (no executions table): check --journal / "
                              "--data-dir (the coordinator's journal is <data-dir>/journal.db)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect_read_only(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self._local.conn = conn
            self._local.db = sqlite_utils.Database(conn)
            with self._lock:
                self._connections.append(conn)
        return conn


def open_journal(config: AuditConfig) -> ReadOnlyJournal:
    """The configured journal, read-only; addresses checked first (one line, not a web3 traceback)."""
    for name, value in [("--contract", config.contract), *[("--recorder", r) for r in config.recorders]]:
        if value and not ADDRESS.match(str(value)):
            raise ConfigError(f"{name} {value!r} is not an Ethereum address (0x followed by 40 hex digits)")
    return ReadOnlyJournal(config.require_journal())


def resolve_task_id(journal: Journal, prefix: str) -> str:
    """A full task id for a unique prefix (or the id itself); unknown prefixes are returned as given."""
    if journal.get(prefix) is not None:
        return prefix
    found = journal.task_ids_with_prefix(prefix, limit=2)
    if len(found) > 1:
        raise ConfigError(f"task id prefix {prefix!r} matches several records: give more of it")
    return found[0] if found else prefix


def data_dir_journal(data_dir: str | None) -> str | None:
    """--data-dir DIR means DIR/journal.db (the coordinator's layout)."""
    return str(Path(data_dir) / "journal.db") if data_dir else None


def guarded(run: Callable[[], int], journal_hint: Callable[[], Any]) -> int:
    """Run the command; a damaged journal or a closed stdout ends it with one line / the right code."""
    try:
        return run()
    except (CorruptJournal, sqlite3.DatabaseError) as exc:
        path = journal_hint() or "the journal"
        print(f"edge-audit: {path} is corrupt or not a SQLite database ({exc}): recover it "
              f"(`sqlite3 {path} .recover | sqlite3 {path}.recovered`) or audit a restored backup "
              "(docs/OPERATIONS.md)", file=sys.stderr)
        return exit_codes.DATA_CORRUPT
    except BrokenPipeError:
        return exit_codes.silence_stdout()
