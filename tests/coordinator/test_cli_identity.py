"""Identity safety at enrolment: one valid certificate per agent id, no silent
re-enrolment of a revoked id, no certificate that is expired at issue, and `agents`
warns before certificates expire."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from security import exit_codes, pki
from tests.support.cli import one_line_error

from .support import cli


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "coord"
    assert cli("init", "--data-dir", str(d)).returncode == 0
    return d


def csr_for(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}-{len(list(tmp_path.glob('*.csr')))}.csr"
    pki.write_pem(pki.make_csr(pki.generate_key(), name), path)
    return path


def test_second_certificate_for_an_active_id_needs_force(data: Path, tmp_path: Path) -> None:
    assert cli("enroll", "--data-dir", str(data), "--bundle", "dev-1").returncode == 0
    one_line_error(cli("enroll", "--data-dir", str(data), str(csr_for(tmp_path, "dev-1"))), exit_codes.USAGE,
             "'dev-1' already has a valid certificate")
    one_line_error(cli("enroll", "--data-dir", str(data), "--bundle", "dev-1", "--out", str(tmp_path / "b2")),
             exit_codes.USAGE, "already has a valid certificate")
    out = cli("enroll", "--data-dir", str(data), str(csr_for(tmp_path, "dev-1")), "--force")
    assert out.returncode == 0 and "BEGIN CERTIFICATE" in out.stdout, out.stderr


def test_revoked_id_is_re_enrolled_only_with_force(data: Path, tmp_path: Path) -> None:
    assert cli("enroll", "--data-dir", str(data), "--bundle", "dev-2").returncode == 0
    assert cli("revoke", "--data-dir", str(data), "dev-2").returncode == 0
    one_line_error(cli("enroll", "--data-dir", str(data), str(csr_for(tmp_path, "dev-2"))), exit_codes.USAGE,
             "'dev-2' was revoked: pass --force")
    out = cli("enroll", "--data-dir", str(data), str(csr_for(tmp_path, "dev-2")), "--force", "--out",
              str(tmp_path / "dev-2.pem"))
    assert out.returncode == 0, out.stderr
    agents = json.loads(cli("agents", "--data-dir", str(data), "--json").stdout)
    assert [a["status"] for a in agents if a["agent_id"] == "dev-2"] == ["never-seen"]  # active again


@pytest.mark.parametrize("days", ["0", "-5"])
def test_no_certificate_expired_at_issue(data: Path, tmp_path: Path, days: str) -> None:
    one_line_error(cli("enroll", "--data-dir", str(data), str(csr_for(tmp_path, "dev-3")), "--days", days),
             exit_codes.USAGE, f"--days {days}: a certificate must be valid for at least 1 day")
    one_line_error(cli("enroll", "--data-dir", str(data), "--bundle", "dev-3", "--days", days), exit_codes.USAGE, "at least 1 day")
    assert not (data / "bundles" / "dev-3").exists()


def test_agents_warns_about_certificates_expiring_soon(data: Path) -> None:
    assert cli("enroll", "--data-dir", str(data), "--bundle", "soon", "--days", "3").returncode == 0
    assert cli("enroll", "--data-dir", str(data), "--bundle", "later").returncode == 0
    out = cli("agents", "--data-dir", str(data), "--json")
    assert out.returncode == 0
    assert {a["agent_id"] for a in json.loads(out.stdout)} == {"soon", "later"}  # stdout stays one JSON document
    warnings = out.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: soon's certificate expires in 3.0 day(s)"), out.stderr
    assert cli("agents", "--data-dir", str(data), "--expiring", "2").stderr == ""
    assert "later's certificate" in cli("agents", "--data-dir", str(data), "--expiring", "400").stderr


def test_renewal_as_documented_keeps_the_key_and_installs_the_new_certificate(data: Path, tmp_path: Path) -> None:
    """docs/OPERATIONS.md "Renew a certificate", step by step with the real CLIs."""
    import os
    import subprocess
    import sys

    from .support import ROOT

    def agent(*argv: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        return subprocess.run([sys.executable, "-m", "agent", "--data-dir", str(home), *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env=env)

    home = tmp_path / "pi-01"
    assert agent("keygen", "--id", "pi-01").returncode == 0
    first = tmp_path / "first.pem"
    assert cli("enroll", "--data-dir", str(data), str(home / "agent.csr"), "--out", str(first)).returncode == 0
    out = agent("enroll", "--cert", str(first), "--ca", str(data / "pki" / "ca.pem"))
    assert out.returncode == 0, out.stderr
    key_before = (home / "agent.key").read_bytes()
    renewed = tmp_path / "pi-01.pem"
    one_line_error(cli("enroll", "--data-dir", str(data), str(home / "agent.csr"), "--out", str(renewed)), exit_codes.USAGE,
             "already has a valid certificate")
    out = cli("enroll", "--data-dir", str(data), str(home / "agent.csr"), "--force", "--days", "365", "--out", str(renewed))
    assert out.returncode == 0, out.stderr
    out = agent("enroll", "--cert", str(renewed), "--ca", str(home / "ca.pem"))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    status = json.loads(agent("status", "--json").stdout)
    new_serial = pki.load_certificate(renewed).serial_number
    assert (home / "agent.key").read_bytes() == key_before
    assert pki.load_certificate(home / "agent.pem").serial_number == new_serial != pki.load_certificate(first).serial_number
    assert status["certificate"]["enrolled"] and status["agent_id"] == "pi-01"
