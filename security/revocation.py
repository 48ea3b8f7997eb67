"""Revocation store: revoked serials in SQLite, published as crl.pem.

Why: a stolen or retired agent must lose access everywhere at once. Mosquitto reads
the CRL (`crlfile`) at the TLS handshake and the signature checks read the same file,
so one `revoke` closes both doors.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .pki import CertificateAuthority, PKIError, common_name, utcnow

CRL_DAYS = 30


class RevocationStore:
    """Revoked certificate serials (with identity and time), kept in one SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute(
                "create table if not exists revoked ("
                " serial text primary key, identity text, revoked_at real not null, reason text)"
            )

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=30)
        return conn

    def revoke(self, cert: x509.Certificate | int, reason: str = "unspecified") -> int:
        """Mark a certificate (or bare serial) revoked; returns the serial. Idempotent."""
        if isinstance(cert, x509.Certificate):
            serial, identity = cert.serial_number, common_name(cert)
        else:
            serial, identity = int(cert), None
        conn = self._connect()
        try:
            with conn:
                conn.execute(
                    "insert or ignore into revoked (serial, identity, revoked_at, reason) values (?, ?, ?, ?)",
                    (str(serial), identity, utcnow().timestamp(), reason),
                )
        finally:
            conn.close()
        return serial

    def is_revoked(self, serial: int) -> bool:
        conn = self._connect()
        try:
            return conn.execute("select 1 from revoked where serial = ?", (str(serial),)).fetchone() is not None
        finally:
            conn.close()

    def revoked(self) -> dict[int, dt.datetime]:
        """serial -> revocation time (UTC)."""
        conn = self._connect()
        try:
            rows = conn.execute("select serial, revoked_at from revoked").fetchall()
        finally:
            conn.close()
        return {int(s): dt.datetime.fromtimestamp(t, dt.UTC) for s, t in rows}

    def identities(self) -> dict[int, str | None]:
        conn = self._connect()
        try:
            return {int(s): i for s, i in conn.execute("select serial, identity from revoked")}
        finally:
            conn.close()

    def write_crl(self, ca: CertificateAuthority, crl_path: Path | str, days: int = CRL_DAYS) -> Path:
        """Write the CRL atomically (temp file + rename) so readers never see half a file."""
        crl = ca.crl(self.revoked(), days=days)
        return write_crl_file(crl, Path(crl_path))


def write_crl_file(crl: x509.CertificateRevocationList, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = crl.public_bytes(serialization.Encoding.PEM)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".crl-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_crl(path: Path | str) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise PKIError(f"CRL {path} not found: run `edge-coordinator init` (it writes an empty CRL)") from exc
    except ValueError as exc:
        raise PKIError(f"CRL {path} is not a PEM CRL: {exc}") from exc
