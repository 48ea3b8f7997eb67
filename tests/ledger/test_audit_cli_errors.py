"""`edge-audit` is a pure reader with one-line errors: read-only journal, damaged files,
malformed addresses, --data-dir, --version, show by unique id prefix."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.journal import Journal
from security import exit_codes
from tests.support.cli import one_line_error

from .helpers import make_record

REPO = Path(__file__).resolve().parents[2]


def audit(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AUDIT_")}
    return subprocess.run([sys.executable, "-m", "ledger.audit_cli", *argv], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)



@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    journal = Journal(tmp_path / "journal.db")
    for i in range(3):
        journal.append(make_record(i, received_at=1_700_000_000 + i))
    journal.close()
    return tmp_path


def test_empty_or_foreign_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    one_line_error(audit("list", "--journal", str(empty)), exit_codes.USAGE, "is not an edgeledger journal")
    assert empty.stat().st_size == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]
    one_line_error(audit("list", "--journal", str(tmp_path / "missing.db")), exit_codes.USAGE, "does not exist")
    assert not (tmp_path / "missing.db").exists()


def test_corrupt_and_truncated_journals_are_one_line(journal_dir: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    one_line_error(audit("list", "--journal", str(garbage)), exit_codes.DATA_CORRUPT, str(garbage), ".recover")
    good = journal_dir / "journal.db"
    conn = sqlite3.connect(good)  # fold the WAL in, so the file alone holds the data
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    truncated = tmp_path / "truncated.db"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    for command in (["list"], ["export"], ["show", "x"]):
        one_line_error(audit(*command, "--journal", str(truncated)), exit_codes.DATA_CORRUPT, str(truncated), ".recover")


def test_malformed_contract_address_is_a_usage_error(journal_dir: Path) -> None:
    one_line_error(audit("verify", "--journal", str(journal_dir / "journal.db"), "--contract", "0x123",
                   "--rpc-url", "http://127.0.0.1:1"), exit_codes.USAGE, "'0x123' is not an Ethereum address")
    one_line_error(audit("--contract", "0x123", "list", "--journal", str(journal_dir / "journal.db")), exit_codes.USAGE,
             "not an Ethereum address")


def test_data_dir_after_the_subcommand_show_by_prefix_and_one_json_document(journal_dir: Path) -> None:
    listed = audit("list", "--data-dir", str(journal_dir), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 3
    before = audit("--data-dir", str(journal_dir), "list", "--json")  # the old position still works
    assert json.loads(before.stdout) == rows
    task_id = rows[1]["task_id"]
    shown = audit("show", task_id[:12], "--data-dir", str(journal_dir), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["task_id"] == task_id, shown.stderr


def test_version() -> None:
    out = audit("--version")
    assert out.returncode == 0 and out.stdout.startswith("edge-audit ")
