"""The operations docs and units say what the code does: the exit-code table is the one
in security/exit_codes.py, and the coordinator unit does not restart on a corrupt journal."""

from __future__ import annotations

import re
from pathlib import Path

from security import exit_codes

ROOT = Path(__file__).resolve().parents[2]


def test_operations_doc_lists_exactly_the_exit_code_table() -> None:
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", section, re.M)
    assert [(int(code), meaning) for code, meaning in rows] == list(exit_codes.TABLE)


def test_coordinator_unit_runs_the_daemon_and_does_not_restart_on_a_corrupt_journal() -> None:
    lines = [line.strip() for line in (ROOT / "packaging" / "edge-coordinator.service").read_text().splitlines()]
    assert any(line.startswith("ExecStart=") and line.endswith("edge-coordinator run") for line in lines)
    assert "ExecReload=/bin/kill -HUP $MAINPID" in lines  # SIGHUP = re-read the CRL (cmd_revoke sends it too)
    assert f"RestartPreventExitStatus={exit_codes.DATA_CORRUPT}" in lines
    assert "Environment=EDGE_COORDINATOR_DATA_DIR=/var/lib/edge-coordinator" in lines
