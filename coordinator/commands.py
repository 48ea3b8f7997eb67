"""The commands the coordinator sent, by task id: what an `edge.command_result` must match.

Why: an agent's certificate lets it send any `edge.command_result` it likes; without a
record of what was actually commanded, the journal would take a report of a command
nobody sent (or of another command than the one sent) as fact. `edge-coordinator send`
records each command here BEFORE publishing it, so the ingest worker can look it up.

The table lives in the coordinator's journal.db (SQLite WAL), which the running daemon
writes at the same time: `record` uses its own short connection with a busy timeout,
and this module owns every SQL statement on the table.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .errors import CoordinatorError

TABLE = "commands"
BUSY_TIMEOUT_SECONDS = 30.0
SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    " task_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, command TEXT NOT NULL,"
    " args_digest TEXT NOT NULL, sent_at REAL NOT NULL)"
)


@dataclass(frozen=True)
class SentCommand:
    task_id: str
    agent_id: str
    command: str  # full task name, e.g. edge.agent.set_interval
    args_digest: str  # sha256 hex of the canonical JSON of the args list sent
    sent_at: float


def ensure_schema(conn: sqlite3.Connection) -> None:
    conn.execute(SCHEMA)


def record(journal_path: Path, command: SentCommand) -> None:
    """Durably record `command` (committed when this returns) or raise CoordinatorError."""
    try:
        conn = sqlite3.connect(str(journal_path), timeout=BUSY_TIMEOUT_SECONDS)
    except sqlite3.Error as exc:
        raise CoordinatorError(f"cannot open the journal {journal_path} to record the command ({exc})") from None
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        with conn:
            ensure_schema(conn)
            conn.execute(
                f"INSERT INTO {TABLE} (task_id, agent_id, command, args_digest, sent_at) VALUES (?, ?, ?, ?, ?)",
                (command.task_id, command.agent_id, command.command, command.args_digest, command.sent_at),
            )
    except sqlite3.Error as exc:
        raise CoordinatorError(
            f"cannot record the command in {journal_path} ({exc}): the command was not sent; check the data dir "
            "is writable and retry"
        ) from None
    finally:
        conn.close()


def forget(journal_path: Path, task_id: str) -> None:
    """Drop a command that was never delivered (the broker refused it): nothing can answer it."""
    conn = sqlite3.connect(str(journal_path), timeout=BUSY_TIMEOUT_SECONDS)
    try:
        with conn:
            conn.execute(f"DELETE FROM {TABLE} WHERE task_id = ?", (task_id,))
    finally:
        conn.close()


def lookup(conn: sqlite3.Connection, agent_id: str, task_id: str) -> SentCommand | None:
    """The command `task_id` if it was sent to `agent_id`, else None."""
    row = conn.execute(
        f"SELECT task_id, agent_id, command, args_digest, sent_at FROM {TABLE} WHERE task_id = ? AND agent_id = ?",
        (task_id, agent_id),
    ).fetchone()
    return SentCommand(*row) if row else None



def find(conn: sqlite3.Connection, task_id: str) -> list[SentCommand]:
    """The command with this exact id, or up to two whose id starts with it (an ambiguous
    prefix shows as two). Raises sqlite3.OperationalError when nothing was ever recorded."""
    rows = conn.execute(
        f"SELECT task_id, agent_id, command, args_digest, sent_at FROM {TABLE} WHERE task_id = ? "
        f"UNION SELECT task_id, agent_id, command, args_digest, sent_at FROM {TABLE} "
        "WHERE substr(task_id, 1, length(?)) = ? LIMIT 2", (task_id, task_id, task_id)).fetchall()
    return [SentCommand(*r) for r in rows]
