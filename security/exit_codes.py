"""Exit codes shared by `edge-agent`, `edge-coordinator` and `edge-audit`.

Why one table: scripts and systemd units branch on them (`RestartPreventExitStatus=`),
so the same cause must exit with the same number whichever tool met it. Documented in
docs/OPERATIONS.md ("Exit codes"). Stdlib only: it is on the device agent's import path.
"""

from __future__ import annotations

OK = 0
ERROR = 1  # an error the operator can fix (one line: cause and fix); edge-audit: records do not match the chain
USAGE = 2  # bad command line or arguments (nothing was done or sent)
TASK_FAILED = 3  # the command reached the agent and FAILED there
TIMEOUT = 4  # no result in time: the command stays queued; `edge-coordinator result ID` later
NOT_DELIVERED = 5  # not delivered: broker unreachable, agent not enrolled, not connected or revoked
PREFLIGHT_FAILED = 6  # `doctor`: at least one check FAILed (each printed with its fix)
DATA_CORRUPT = 65  # a SQLite file (journal, outbox) is corrupt: recover or restore it, do not restart
REVOKED = 78  # this agent's certificate is revoked: it refuses to run until re-enrolled
INTERRUPTED = 130  # SIGINT / Ctrl-C
BROKEN_PIPE = 141  # stdout closed early (`edge-coordinator agents | head`), as 128+SIGPIPE

TABLE = (
    (OK, "success"),
    (ERROR, "error the operator can fix (the message says how); edge-audit verify/reconcile: mismatches found"),
    (USAGE, "usage or configuration error: bad option, argument, address, or a countdown beyond max_delay_seconds; nothing was done or sent"),
    (TASK_FAILED, "the command ran on the agent and failed"),
    (TIMEOUT, "no result in time; the command stays queued (`edge-coordinator result ID`)"),
    (NOT_DELIVERED, "not delivered: broker unreachable, agent not enrolled, not connected or revoked"),
    (PREFLIGHT_FAILED, "`doctor` found at least one FAIL (each line names its fix)"),
    (DATA_CORRUPT, "a SQLite file is corrupt: `sqlite3 FILE .recover` or restore a backup"),
    (REVOKED, "this agent is revoked: re-enroll it"),
    (INTERRUPTED, "interrupted"),
    (BROKEN_PIPE, "the reader of stdout went away (output piped into head); nothing more is printed"),
)


def silence_stdout() -> int:
    """After a BrokenPipeError: point stdout at /dev/null so the interpreter's final flush
    does not print a second error, and return BROKEN_PIPE for the tool to exit with."""
    import os
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return BROKEN_PIPE
