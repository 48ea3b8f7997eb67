"""`edge-agent doctor` against a real Mosquitto with mutual TLS: every check, one line each with its fix.

A healthy enrolled device passes (exit 0, the broker check is a real CONNECT with its
certificate); each thing a device operator can get wrong turns exactly its check to
FAIL (exit 6) with the fix on the next line; --json carries the same findings.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import update_toml
from security import exit_codes, pki
from tests.support.mosquitto import FleetPKI, MosquittoBroker

from .support import ROOT, enrolled_agent


def doctor(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "--data-dir", str(data_dir), "doctor", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def statuses(out: subprocess.CompletedProcess) -> dict[str, str]:
    return {c["name"]: c["status"] for c in json.loads(out.stdout)["checks"]}


@pytest.fixture
def device(tmp_path: Path, test_pki: FleetPKI, mosquitto: MosquittoBroker) -> Path:
    data_dir = enrolled_agent(test_pki, tmp_path / "dev", "doc-01")
    update_toml(data_dir, broker_url=mosquitto.tls_url)
    pki.write_pem(test_pki.ca.crl({}, days=7), data_dir / "crl.pem")
    return data_dir


def test_healthy_device_passes_every_check_with_a_real_tls_connect(device: Path) -> None:
    out = doctor(device)
    assert out.returncode == exit_codes.OK, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert all(line.startswith("OK") for line in lines[:-1]), out.stdout
    assert "TLS handshake and MQTT CONNECT as 'doc-01' accepted" in out.stdout
    assert "0 failure(s)" in lines[-1]
    found = json.loads(doctor(device, "--json").stdout)
    assert found["ok"] is True
    names = [c["name"] for c in found["checks"]]
    for name in ("agent id", "key", "certificate chain", "certificate CN", "certificate expiry", "broker", "outbox", "disk"):
        assert name in names, names


def test_group_readable_key_fails_with_chmod_fix(device: Path) -> None:
    (device / "agent.key").chmod(0o640)
    out = doctor(device)
    assert out.returncode == exit_codes.PREFLIGHT_FAILED
    assert "FAIL  key" in out.stdout and f"fix: chmod 600 {device / 'agent.key'}" in out.stdout


def test_agent_id_differing_from_cn_fails(device: Path) -> None:
    update_toml(device, agent_id="doc-02")
    out = doctor(device, "--json")
    assert out.returncode == exit_codes.PREFLIGHT_FAILED
    assert statuses(out)["certificate CN"] == "FAIL"
    assert statuses(out)["certificate chain"] == "OK"


def test_expired_and_expiring_certificates(device: Path, test_pki: FleetPKI, tmp_path: Path) -> None:
    key = pki.load_private_key(device / "agent.key")
    now = dt.datetime.now(dt.UTC)
    csr = pki.make_csr(key, "doc-01")
    pki.write_pem(test_pki.ca.issue(csr, not_before=now - dt.timedelta(days=30), not_after=now + dt.timedelta(days=3)),
                  device / "agent.pem")
    out = doctor(device)
    assert out.returncode == exit_codes.OK, out.stdout  # a warning is not a failure
    assert "WARN  certificate expiry" in out.stdout and "edge-agent renew" in out.stdout
    pki.write_pem(test_pki.ca.issue(csr, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)),
                  device / "agent.pem")
    out = doctor(device, "--json")
    assert out.returncode == exit_codes.PREFLIGHT_FAILED
    assert statuses(out)["certificate expiry"] == "FAIL"


def test_certificate_of_another_ca_fails_chain_and_broker(device: Path, tmp_path: Path) -> None:
    other = pki.CertificateAuthority.create("not the fleet CA")
    key = pki.load_private_key(device / "agent.key")
    pki.write_pem(other.issue(pki.make_csr(key, "doc-01")), device / "agent.pem")
    st = statuses(doctor(device, "--json"))
    assert st["certificate chain"] == "FAIL"
    assert st["broker"] == "FAIL"  # the broker refuses the handshake too


def test_stale_crl_fails(device: Path, test_pki: FleetPKI) -> None:
    now = dt.datetime.now(dt.UTC)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    stale = (x509.CertificateRevocationListBuilder().issuer_name(test_pki.ca.cert.subject)
             .last_update(now - dt.timedelta(days=10)).next_update(now - dt.timedelta(days=1))
             .sign(test_pki.ca.key, hashes.SHA256()))
    pki.write_pem(stale, device / "crl.pem")
    out = doctor(device)
    assert out.returncode == exit_codes.PREFLIGHT_FAILED
    assert "FAIL  crl" in out.stdout and "next-update passed" in out.stdout


def test_corrupt_outbox_fails_with_recovery_step(device: Path) -> None:
    (device / "outbox.sqlite3").write_bytes(b"SQLite format 3\x00" + b"\x07" * 3000)
    out = doctor(device)
    assert out.returncode == exit_codes.PREFLIGHT_FAILED
    assert "FAIL  outbox" in out.stdout and ".recover" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_unreachable_broker_fails(device: Path) -> None:
    from tests.support.net import free_port

    update_toml(device, broker_url=f"mqtts://127.0.0.1:{free_port()}")
    out = doctor(device, "--timeout", "2")
    assert out.returncode == exit_codes.PREFLIGHT_FAILED
    assert "FAIL  broker" in out.stdout and "Connection refused" in out.stdout
