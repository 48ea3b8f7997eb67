"""The agent's one exception type.

Why: the CLI prints `edge-agent: <message>` and exits 1 for these; every message
names the cause and the command that fixes it, so an operator never needs a traceback.
"""

from __future__ import annotations


class AgentError(Exception):
    """Something the operator can fix; the message says how (one line)."""
