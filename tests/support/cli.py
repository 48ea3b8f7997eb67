"""Asserting the CLIs' error contract: one line on stderr naming cause and fix, no traceback."""

from __future__ import annotations

import subprocess


def one_line_error(out: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """`out` exited `code` with exactly one stderr line, no traceback, containing every needle."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr
