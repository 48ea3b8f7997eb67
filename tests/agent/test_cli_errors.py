"""`edge-agent` with a damaged outbox exits once with a distinct code (no systemd crash
loop) and one line naming the file and the recovery; --version, --data-dir positions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from security import exit_codes, pki
from tests.support.mosquitto import FleetPKI

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "edge-agent.service"


def agent(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run([sys.executable, "-m", "agent", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture
def enrolled(tmp_path: Path, test_pki: FleetPKI) -> Path:
    data = tmp_path / "data"
    assert agent("--data-dir", str(data), "keygen", "--id", "dev-9").returncode == 0
    cert = tmp_path / "dev-9.pem"
    pki.write_pem(test_pki.ca.issue(pki.load_csr(data / "agent.csr")), cert)
    out = agent("enroll", "--data-dir", str(data), "--cert", str(cert), "--ca", str(test_pki.ca_path),
                "--broker-url", "mqtts://127.0.0.1:1")
    assert out.returncode == 0, out.stderr
    return data


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_outbox_exits_65_once_with_the_recovery(enrolled: Path, damage: str) -> None:
    from agent.outbox import Outbox

    outbox = enrolled / "outbox.sqlite3"
    if damage == "garbage":
        outbox.write_bytes(b"\x00garbage" * 4000)
    else:
        box = Outbox(outbox, "dev-9")
        for i in range(300):
            box.set_meta(f"k{i}", "v" * 400)
        box.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        box.close()
        data = outbox.read_bytes()
        outbox.write_bytes(data[: len(data) // 2])
    for argv in (["status"], ["status", "--json"], ["run"]):
        out = agent(argv[0], "--data-dir", str(enrolled), *argv[1:])
        assert out.returncode == exit_codes.DATA_CORRUPT, (argv, out.stderr)
        assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert str(outbox) in out.stderr and f"sqlite3 {outbox} .recover" in out.stderr and "backup" in out.stderr
        assert out.stdout == ""


def test_a_clean_stop_is_recorded_and_damage_after_it_still_exits_65(enrolled: Path, mosquitto) -> None:
    """`run` scans the outbox fully only after an unclean stop (ledger.sqlite_files); a
    file damaged after a clean stop is still refused with the one-line recovery."""
    from ledger.sqlite_files import clean_stop_marker
    from tests.agent.support import start_agent

    proc = start_agent(enrolled, mosquitto.tls_url, interval=3600)
    proc.stop()  # SIGTERM: the orderly stop a service manager does
    outbox, quarantine = enrolled / "outbox.sqlite3", enrolled / "quarantine.sqlite"
    assert proc.proc is not None and proc.proc.returncode == 0, proc.output()[-2000:]
    assert clean_stop_marker(outbox).exists() and clean_stop_marker(quarantine).exists()
    data = outbox.read_bytes()
    outbox.write_bytes(data[: len(data) // 2])
    out = agent("run", "--data-dir", str(enrolled), "--broker-url", mosquitto.tls_url)
    assert out.returncode == exit_codes.DATA_CORRUPT, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert str(outbox) in out.stderr and f"sqlite3 {outbox} .recover" in out.stderr
    assert not clean_stop_marker(outbox).exists()  # consumed: the next start scans in full


def test_systemd_does_not_restart_on_a_corrupt_outbox_or_a_revocation() -> None:
    lines = [line.strip() for line in UNIT.read_text().splitlines()]
    assert f"RestartPreventExitStatus={exit_codes.REVOKED} {exit_codes.DATA_CORRUPT}" in lines


def test_version_and_data_dir_after_the_subcommand(enrolled: Path) -> None:
    out = agent("--version")
    assert out.returncode == 0 and out.stdout.startswith("edge-agent ")
    after = agent("status", "--json", "--data-dir", str(enrolled))
    before = agent("--data-dir", str(enrolled), "status", "--json")
    assert after.returncode == before.returncode == 0, after.stderr
    assert json.loads(after.stdout)["agent_id"] == json.loads(before.stdout)["agent_id"] == "dev-9"
