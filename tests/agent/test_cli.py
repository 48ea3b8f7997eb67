"""edge-agent keygen / enroll / status against a real CA (tests' FleetPKI)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from security import pki
from tests.support.mosquitto import FleetPKI

ROOT = Path(__file__).resolve().parents[2]


def sign_csr(test_pki: FleetPKI, data_dir: Path, out: Path) -> Path:
    csr = pki.load_csr(data_dir / "agent.csr")
    cert_path = out / f"{pki.common_name(csr)}.pem"
    pki.write_pem(test_pki.ca.issue(csr), cert_path)
    return cert_path


def test_help_everywhere() -> None:
    for args in ([], ["keygen"], ["enroll"], ["run"], ["status"]):
        proc = subprocess.run([sys.executable, "-m", "agent", *args, "--help"], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        assert proc.returncode == 0 and "usage: edge-agent" in proc.stdout


def test_keygen_enroll_status(tmp_path: Path, test_pki: FleetPKI, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    assert main(["--data-dir", str(data), "keygen", "--id", "dev-7"]) == 0
    assert stat.S_IMODE(os.stat(data / "agent.key").st_mode) == 0o600
    csr = pki.load_csr(data / "agent.csr")
    assert pki.common_name(csr) == "dev-7"
    assert main(["--data-dir", str(data), "keygen", "--id", "dev-7"]) == 1
    assert "--force" in capsys.readouterr().err

    cert = sign_csr(test_pki, data, tmp_path)
    assert main(["--data-dir", str(data), "enroll", "--cert", str(cert), "--ca", str(test_pki.ca_path),
                 "--broker-url", "mqtts://127.0.0.1:8883"]) == 0
    assert (data / "agent.pem").read_bytes() == cert.read_bytes()
    capsys.readouterr()
    assert main(["--data-dir", str(data), "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["agent_id"] == "dev-7" and st["broker_url"] == "mqtts://127.0.0.1:8883"
    assert st["certificate"]["subject"] == "dev-7" and st["certificate"]["days_left"] > 300
    assert st["outbox"]["backlog"] == 0 and st["outbox"]["last_flush_at"] is None
    assert main(["--data-dir", str(data), "status"]) == 0
    text = capsys.readouterr().out
    assert "dev-7" in text and "last flush:   never" in text


def test_enroll_bundle_and_refusals(tmp_path: Path, test_pki: FleetPKI, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    main(["--data-dir", str(data), "keygen", "--id", "dev-8"])
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    sign_csr(test_pki, data, bundle)
    (bundle / "ca.pem").write_bytes(test_pki.ca_path.read_bytes())
    (bundle / "agent.toml").write_text('broker_url = "mqtts://10.0.0.1:8883"\n')

    # a certificate for another key is refused
    other_cert, _ = test_pki.client("someone-else")
    assert main(["--data-dir", str(data), "enroll", "--cert", str(other_cert), "--ca", str(test_pki.ca_path)]) == 1
    assert "does not match this device's key" in capsys.readouterr().err
    # a certificate not signed by the given CA is refused
    foreign = pki.CertificateAuthority.create("other CA")
    foreign.save(tmp_path / "foreign")
    assert main(["--data-dir", str(data), "enroll", "--bundle", str(bundle),]) == 0
    assert main(["--data-dir", str(data), "enroll", "--cert", str(bundle / "dev-8.pem"),
                 "--ca", str(tmp_path / "foreign" / "ca.pem")]) == 1
    assert "not signed by the given CA" in capsys.readouterr().err
    capsys.readouterr()
    main(["--data-dir", str(data), "status", "--json"])
    st = json.loads(capsys.readouterr().out)
    assert st["broker_url"] == "mqtts://10.0.0.1:8883" and st["certificate"]["enrolled"]


def test_run_without_enrollment_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["--data-dir", str(tmp_path), "keygen", "--id", "dev-9"])
    assert main(["--data-dir", str(tmp_path), "run"]) == 1
    assert "run `edge-agent enroll`" in capsys.readouterr().err


def test_enroll_demo_bundle_with_key(tmp_path: Path, test_pki: FleetPKI, capsys: pytest.CaptureFixture) -> None:
    """The coordinator's demo bundle: <id>.key + <id>.pem + ca.pem + agent.toml (with relative paths)."""
    bundle = tmp_path / "bundle"
    pki.issue_identity(test_pki.ca, bundle, "demo-3")
    (bundle / "ca.pem").write_bytes(test_pki.ca_path.read_bytes())
    (bundle / "agent.toml").write_text('agent_id = "demo-3"\nbroker_url = "mqtts://127.0.0.1:1"\n'
                                       'ca_file = "ca.pem"\ncert_file = "demo-3.pem"\nkey_file = "demo-3.key"\n')
    data = tmp_path / "data"
    assert main(["--data-dir", str(data), "enroll", "--bundle", str(bundle)]) == 0
    assert stat.S_IMODE(os.stat(data / "agent.key").st_mode) == 0o600
    capsys.readouterr()
    assert main(["--data-dir", str(data), "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["agent_id"] == "demo-3" and st["broker_url"] == "mqtts://127.0.0.1:1"
    assert st["certificate"]["subject"] == "demo-3"


def test_enroll_refuses_a_revoked_certificate_and_installs_the_crl(tmp_path: Path, test_pki: FleetPKI,
                                                                   capsys: pytest.CaptureFixture) -> None:
    import datetime as dt

    data = tmp_path / "data"
    main(["--data-dir", str(data), "keygen", "--id", "dev-crl"])
    cert_path = sign_csr(test_pki, data, tmp_path)
    cert = pki.load_certificate(cert_path)
    revoked, clean = tmp_path / "revoked.pem", tmp_path / "clean.pem"
    pki.write_pem(test_pki.ca.crl({cert.serial_number: dt.datetime.now(dt.UTC)}), revoked)
    pki.write_pem(test_pki.ca.crl({}), clean)
    base = ["--data-dir", str(data), "enroll", "--cert", str(cert_path), "--ca", str(test_pki.ca_path)]
    assert main(base + ["--crl", str(revoked)]) == 1
    assert "revoked" in capsys.readouterr().err and not (data / "agent.pem").exists()
    assert main(base + ["--crl", str(clean)]) == 0
    assert (data / "crl.pem").read_bytes() == clean.read_bytes()
