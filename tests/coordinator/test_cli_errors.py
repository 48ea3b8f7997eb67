"""Nothing an operator can cause prints a traceback: damaged journal, missing PKI files
(found before the broker and chain start), a closed stdout; plus --version/--data-dir."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from security import exit_codes
from tests.support.cli import one_line_error

from .support import ROOT, cli


@pytest.fixture
def data(tmp_path: Path) -> Path:
    from tests.support.net import free_port

    d = tmp_path / "coord"
    out = cli("init", "--data-dir", str(d), "--broker-port", str(free_port()), "--chain-port", str(free_port()),
              "--http-port", str(free_port()))
    assert out.returncode == 0, out.stderr
    return d


def test_corrupt_journal_is_one_line_for_agents_run_and_result(data: Path) -> None:
    journal = data / "journal.db"
    journal.write_bytes(b"not a database at all" * 50)
    for argv in (["agents"], ["run"], ["result", "1234"]):
        one_line_error(cli(*argv, "--data-dir", str(data)), exit_codes.DATA_CORRUPT, str(journal), ".recover")
    assert not (data / "run" / "mosquitto" / "mosquitto.pid").exists()  # run stopped before starting the broker


def test_truncated_journal_is_one_line(data: Path) -> None:
    journal = data / "journal.db"
    conn = sqlite3.connect(journal)
    conn.execute("CREATE TABLE filler (x TEXT)")
    conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,) for _ in range(200)])
    conn.commit()
    conn.close()
    data_bytes = journal.read_bytes()
    journal.write_bytes(data_bytes[: len(data_bytes) // 2])
    one_line_error(cli("agents", "--data-dir", str(data)), exit_codes.DATA_CORRUPT, str(journal), ".recover")


@pytest.mark.parametrize("name", ["broker.key", "coordinator.pem"])
def test_missing_pki_file_is_found_before_anything_starts_and_repair_fixes_it(data: Path, name: str) -> None:
    (data / "pki" / name).unlink()
    out = cli("run", "--data-dir", str(data))
    one_line_error(out, exit_codes.ERROR, f"{data / 'pki' / name} is missing", "init --repair")
    assert out.stdout == ""  # nothing started, nothing logged
    out = cli("init", "--repair", "--data-dir", str(data))
    assert out.returncode == 0 and "re-issued" in out.stdout, out.stderr
    assert (data / "pki" / name).exists()


def test_missing_ca_key_says_restore_from_backup(data: Path) -> None:
    (data / "pki" / "ca.key").unlink()
    one_line_error(cli("run", "--data-dir", str(data)), exit_codes.ERROR, "ca.key is missing", "from a backup")


def test_closed_stdout_is_not_a_traceback(data: Path) -> None:
    for i in range(3):
        assert cli("enroll", "--data-dir", str(data), "--bundle", f"dev-{i}").returncode == 0
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write (`agents | head` when head has exited)
    try:
        proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "agents", "--data-dir", str(data)], cwd=ROOT,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == exit_codes.BROKEN_PIPE and proc.stderr == "", proc.stderr


def test_version_and_data_dir_in_both_positions(data: Path) -> None:
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("edge-coordinator ")
    assert cli("enroll", "--bundle", "dev-x", "--data-dir", str(data)).returncode == 0
    after = cli("agents", "--data-dir", str(data), "--json")
    before = cli("--data-dir", str(data), "agents", "--json")
    assert after.returncode == before.returncode == 0 and after.stdout == before.stdout and '"dev-x"' in after.stdout
