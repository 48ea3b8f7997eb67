"""The agent's one exception type.

Why: the CLI prints `edge-agent: <message>` and exits with `code` (1 unless the cause
has its own exit code in security.exit_codes); every message names the cause and the
command that fixes it, so an operator never needs a traceback.
"""

from __future__ import annotations

from pathlib import Path

from security import exit_codes


class AgentError(Exception):
    """Something the operator can fix; the message says how (one line)."""

    def __init__(self, message: str, code: int = exit_codes.ERROR) -> None:
        super().__init__(message)
        self.code = code


def corrupt_file(path: Path, reason: str) -> AgentError:
    """A damaged SQLite file (outbox, quarantine): exit DATA_CORRUPT, which the systemd unit
    does not restart (a restart would meet the same file: a crash loop)."""
    return AgentError(
        f"{path} is corrupt or not a SQLite database ({reason}): stop the agent, then recover it "
        f"(`sqlite3 {path} .recover | sqlite3 {path}.recovered`, move it in place) or restore a backup; "
        "moving it aside starts an empty one (unsent readings in it are lost)", exit_codes.DATA_CORRUPT)
