"""The one exception type the CLI turns into a one-line message and an exit code.

Why: operators see `edge-coordinator: <cause>: <fix>` instead of a traceback, and
scripts see which kind of failure it was (security.exit_codes, docs/OPERATIONS.md).
"""

from __future__ import annotations

from security import exit_codes


class CoordinatorError(Exception):
    """Something the operator can fix; the message says what and how."""

    def __init__(self, message: str, code: int = exit_codes.ERROR) -> None:
        super().__init__(message)
        self.code = code
