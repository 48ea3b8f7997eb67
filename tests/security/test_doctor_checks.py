"""security.doctor's checks on files alone (no processes): the fast layer under the doctor tests.

Each check gives OK/WARN/FAIL with a fix for exactly the condition it names; a check
that raises becomes a FAIL line, never a crashed doctor; the report's exit code is
PREFLIGHT_FAILED only when something FAILs.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from security import doctor as d
from security import exit_codes, pki


@pytest.fixture
def ca(tmp_path: Path) -> pki.CertificateAuthority:
    authority = pki.CertificateAuthority.create("doctor test CA")
    authority.save(tmp_path)
    return authority


def test_key_permissions(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    pki.write_private_key(pki.generate_key(), key)
    assert d.key_file("key", key, "keygen").status == d.OK
    key.chmod(0o644)
    found = d.key_file("key", key, "keygen")
    assert found.status == d.FAIL and found.fix == f"chmod 600 {key}"
    key.write_text("not a key")
    key.chmod(0o600)
    assert d.key_file("key", key, "keygen").status == d.FAIL
    assert d.key_file("key", tmp_path / "absent.key", "keygen").fix == "keygen"


def test_certificate_expiry_window(tmp_path: Path, ca: pki.CertificateAuthority) -> None:
    now = dt.datetime.now(dt.UTC)
    csr = pki.make_csr(pki.generate_key(), "dev-1")
    soon = ca.issue(csr, not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=3))
    later = ca.issue(csr, not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=300))
    future = ca.issue(csr, not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=300))
    assert d.expiry("e", soon, "renew", warn_days=14).status == d.WARN
    assert d.expiry("e", soon, "renew", warn_days=2).status == d.OK
    assert d.expiry("e", later, "renew").status == d.OK
    assert d.expiry("e", soon, "renew", now=now + dt.timedelta(days=4)).status == d.FAIL
    assert "clock" in d.expiry("e", future, "renew").fix


def test_certificate_chain_cn_and_key(tmp_path: Path, ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    pki.write_private_key(key, tmp_path / "dev.key")
    pki.write_pem(ca.issue(pki.make_csr(key, "dev-1")), tmp_path / "dev.pem")
    found = {f.name: f.status for f in d.certificate("c", tmp_path / "dev.pem", tmp_path / "ca.pem", expected_cn="dev-1",
                                                     key_path=tmp_path / "dev.key", fix="x")}
    assert found == {"c chain": d.OK, "c CN": d.OK, "c expiry": d.OK}
    found = {f.name: f.status for f in d.certificate("c", tmp_path / "dev.pem", tmp_path / "ca.pem", expected_cn="dev-2",
                                                     key_path=tmp_path / "dev.key", fix="x")}
    assert found["c CN"] == d.FAIL
    pki.write_private_key(pki.generate_key(), tmp_path / "other.key")
    found = {f.name: f.status for f in d.certificate("c", tmp_path / "dev.pem", tmp_path / "ca.pem", expected_cn=None,
                                                     key_path=tmp_path / "other.key", fix="x")}
    assert found["c key"] == d.FAIL


def test_sqlite_integrity(tmp_path: Path) -> None:
    import sqlite3

    good = tmp_path / "good.db"
    with sqlite3.connect(good) as conn:
        conn.execute("CREATE TABLE t (x)")
    assert d.sqlite_integrity("db", good).status == d.OK
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 200)
    found = d.sqlite_integrity("db", bad)
    assert found.status == d.FAIL and ".recover" in found.fix
    assert d.sqlite_integrity("db", tmp_path / "absent.db").status == d.OK


def test_disk_thresholds(tmp_path: Path) -> None:
    assert d.disk_space(tmp_path, warn=0, fail=0).status == d.OK
    assert d.disk_space(tmp_path, warn=1 << 62, fail=0).status == d.WARN
    assert d.disk_space(tmp_path / "not" / "yet", warn=1 << 62, fail=1 << 61).status == d.FAIL


def test_guarded_check_and_report(capsys: pytest.CaptureFixture) -> None:
    def boom() -> d.Finding:
        raise RuntimeError("disk on fire")

    found = d.guarded("x", boom)
    assert found[0].status == d.FAIL and "disk on fire" in found[0].detail
    assert d.report("t", [d.Finding("a", d.OK, "fine"), d.Finding("b", d.WARN, "hm", "do y")], False) == exit_codes.OK
    assert d.report("t", found, True) == exit_codes.PREFLIGHT_FAILED
    lines = capsys.readouterr().out
    doc = json.loads(lines[lines.index("{"):])
    assert doc["ok"] is False and doc["checks"][0]["name"] == "x"
