"""The one exception type the CLI turns into a one-line message and exit code 1.

Why: operators see `edge-coordinator: <cause>: <fix>` instead of a traceback.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Something the operator can fix; the message says what and how."""
