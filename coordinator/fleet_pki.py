"""The coordinator's side of the fleet PKI: init, enroll, bundles, revoke.

Why: `security.pki` knows how to make and sign certificates; this module decides
where they live in the data directory, remembers what was issued (so `revoke AGENT`
can find every serial of that agent) and keeps the CRL file the broker and the
signature checks read.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from security.pki import (
    CertificateAuthority,
    PKIError,
    common_name,
    fingerprint,
    issue_identity,
    load_certificate,
    load_csr,
    write_pem,
)

from security.revocation import RevocationStore, write_crl_file

from .config import CoordinatorConfig
from .errors import CoordinatorError

BROKER_IDENTITY = "broker"
BROKER_HOSTS = ("127.0.0.1", "localhost")
CRL_DAYS = 3650  # the CRL is rewritten on every revoke; a long next_update keeps a quiet fleet working


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers (Mosquitto on SIGHUP, the verifier) never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class IssuedCert:
    name: str
    serial: int
    fingerprint: str
    not_after: float


class FleetStore:
    """PKI files under `<data_dir>/pki`: ca.*, coordinator.*, broker.*, crl.pem, issued.json."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.pki_dir

    # -- files --
    @property
    def issued_path(self) -> Path:
        return self.dir / "issued.json"

    @property
    def revoked_path(self) -> Path:
        return self.dir / "revoked.sqlite"

    @property
    def broker_cert(self) -> Path:
        return self.dir / f"{BROKER_IDENTITY}.pem"

    @property
    def broker_key(self) -> Path:
        return self.dir / f"{BROKER_IDENTITY}.key"

    def exists(self) -> bool:
        return (self.dir / "ca.key").exists()

    def ca(self) -> CertificateAuthority:
        try:
            return CertificateAuthority.load(self.dir)
        except PKIError as exc:
            raise CoordinatorError(f"{exc} (data dir {self.cfg.data_dir}: run `edge-coordinator init`)") from None

    # -- init --
    def init(self) -> None:
        """A new CA, the coordinator's client cert, the broker's server cert, an empty CRL."""
        if self.exists():
            raise CoordinatorError(f"{self.dir} already holds a CA: use another --data-dir or remove it to start over")
        ca = CertificateAuthority.create("edgeledger fleet CA")
        ca.save(self.dir)
        self._remember(issue_identity(ca, self.dir, self.cfg.identity)[0])
        self._remember(issue_identity(ca, self.dir, BROKER_IDENTITY, client=False, server=True, hosts=BROKER_HOSTS)[0])
        self._write_crl(ca, {})

    # -- registry of issued certificates --
    def issued(self) -> list[IssuedCert]:
        if not self.issued_path.exists():
            return []
        return [IssuedCert(**row) for row in json.loads(self.issued_path.read_text())]

    def _remember(self, cert_path: Path) -> x509.Certificate:
        cert = load_certificate(cert_path)
        rows = [r.__dict__ for r in self.issued()]
        rows.append(
            IssuedCert(
                name=common_name(cert),
                serial=cert.serial_number,
                fingerprint=fingerprint(cert),
                not_after=cert.not_valid_after_utc.timestamp(),
            ).__dict__
        )
        _atomic_write(self.issued_path, json.dumps(rows, indent=1).encode())
        return cert

    def latest(self, name: str) -> IssuedCert | None:
        found = [c for c in self.issued() if c.name == name]
        return found[-1] if found else None

    # -- enroll --
    def sign_csr(self, csr_pem: bytes, days: int = 365) -> bytes:
        """Issue a client certificate for an agent's CSR (its key never leaves the device)."""
        try:
            csr = load_csr(csr_pem)
            name = common_name(csr)
        except PKIError as exc:
            raise CoordinatorError(str(exc)) from None
        self._refuse_reserved(name)
        ca = self.ca()
        try:
            cert = ca.issue(csr, client=True, days=days)
        except PKIError as exc:
            raise CoordinatorError(str(exc)) from None
        target = self.dir / "issued" / f"{name}-{cert.serial_number:x}.pem"
        write_pem(cert, target)
        self._remember(target)
        return target.read_bytes()

    def _refuse_reserved(self, name: str) -> None:
        if name in (self.cfg.identity, BROKER_IDENTITY):
            raise CoordinatorError(f"identity {name!r} is reserved for the coordinator/broker: pick another agent name")

    def make_bundle(self, name: str, out: Path | None, broker_url: str, days: int = 365) -> Path:
        """Demo convenience: key + CSR + cert for a simulated agent, plus agent.toml."""
        self._refuse_reserved(name)
        ca = self.ca()
        out = Path(out) if out else self.cfg.data_dir / "bundles" / name
        if (out / f"{name}.pem").exists():
            raise CoordinatorError(f"bundle {out} already exists: pick another --out or name")
        out.mkdir(parents=True, exist_ok=True)
        try:
            cert_path, _ = issue_identity(ca, out, name, days=days)
        except PKIError as exc:
            raise CoordinatorError(str(exc)) from None
        self._remember(cert_path)
        (out / "ca.pem").write_bytes(self.cfg.ca_path.read_bytes())
        (out / "crl.pem").write_bytes(self.cfg.crl_path.read_bytes())
        log_pub = self.cfg.pki_dir / "log.pub"  # the transparency log's verifier key (issue #12)
        if log_pub.exists():
            (out / "log.pub").write_bytes(log_pub.read_bytes())
        (out / "agent.toml").write_text(
            f'agent_id = "{name}"\n'
            f'broker_url = "{broker_url}"\n'
            'ca_file = "ca.pem"\n'
            f'cert_file = "{name}.pem"\n'
            f'key_file = "{name}.key"\n'
        )
        return out

    # -- revocation (security.revocation keeps the serials; we map names to serials) --
    def revocations(self) -> RevocationStore:
        return RevocationStore(self.revoked_path)

    def revoke(self, name: str) -> list[int]:
        """Revoke every certificate issued to `name`; rewrite the CRL. Returns the serials."""
        self._refuse_reserved(name)
        issued = [c for c in self.issued() if c.name == name]
        if not issued:
            raise CoordinatorError(f"no certificate was issued to {name!r}: see `edge-coordinator agents`")
        store = self.revocations()
        for cert in issued:
            path = self._cert_file(cert)
            store.revoke(load_certificate(path) if path else cert.serial, reason="operator")
        store.write_crl(self.ca(), self.cfg.crl_path, days=CRL_DAYS)
        return [c.serial for c in issued]

    def _cert_file(self, cert: IssuedCert) -> Path | None:
        for path in (self.dir / "issued" / f"{cert.name}-{cert.serial:x}.pem", self.cfg.data_dir / "bundles" / cert.name / f"{cert.name}.pem"):
            if path.exists() and load_certificate(path).serial_number == cert.serial:
                return path
        return None

    def is_revoked(self, name: str) -> bool:
        mine = [c.serial for c in self.issued() if c.name == name]
        if not mine or not self.revoked_path.exists():
            return False
        store = self.revocations()
        return all(store.is_revoked(s) for s in mine)

    def _write_crl(self, ca: CertificateAuthority, revoked: dict[int, dt.datetime]) -> None:
        write_crl_file(ca.crl(revoked, days=CRL_DAYS), self.cfg.crl_path)
