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
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from security import exit_codes
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
from security.settings_render import write_toml

from .config import CoordinatorConfig
from .errors import CoordinatorError

BROKER_IDENTITY = "broker"
BROKER_HOSTS = ("127.0.0.1", "localhost")
#: Never agent names: they are (or may become) the coordinator's and the broker's identities.
RESERVED_NAMES = ("coordinator", BROKER_IDENTITY)


def broker_hosts(cert_path: Path) -> tuple[str, ...]:
    """The host names and addresses in a broker certificate's subjectAltName (not its CN)."""
    try:
        cert = load_certificate(cert_path)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (PKIError, x509.ExtensionNotFound):
        return ()
    names = [str(v) for v in san.get_values_for_type(x509.DNSName) if v != BROKER_IDENTITY]
    names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    return tuple(names)


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

    def repair(self) -> list[Path]:
        """Re-issue the coordinator's and the broker's certificate (new keys) from the existing CA
        when either file of the pair is missing. Agents are untouched: they trust the CA."""
        if not self.exists():
            raise CoordinatorError(f"{self.dir} holds no fleet CA: restore it from a backup, or `init` a new data dir")
        ca = self.ca()
        made: list[Path] = []
        pairs = ((self.cfg.identity, self.cfg.cert_path, self.cfg.key_path, {}),
                 (BROKER_IDENTITY, self.broker_cert, self.broker_key,
                  {"client": False, "server": True, "hosts": BROKER_HOSTS}))
        for name, cert, key, extra in pairs:
            if cert.exists() and key.exists():
                continue
            self._remember(issue_identity(ca, self.dir, name, **extra)[0])
            made.append(cert)
        if not self.cfg.crl_path.exists():
            self.reissue_crl()
            made.append(self.cfg.crl_path)
        return made

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
    def active_certificates(self, name: str, now: float | None = None) -> list[IssuedCert]:
        """Certificates of `name` that are issued, unrevoked and unexpired (they can still sign)."""
        now = time.time() if now is None else now
        mine = [c for c in self.issued() if c.name == name and c.not_after > now]
        if not mine or not self.revoked_path.exists():
            return mine
        store = self.revocations()
        return [c for c in mine if not store.is_revoked(c.serial)]

    def check_issuable(self, name: str, days: int, force: bool = False) -> None:
        """Refuse what would make two devices one identity, or an unusable certificate.

        Why: a second valid certificate for an active id lets two devices sign as one
        agent (its readings, its commands); re-enrolling a revoked id quietly undoes a
        revocation. Both need --force, and say so. A certificate that is expired at
        issue (days <= 0) is refused outright."""
        self._refuse_reserved(name)
        if days <= 0:
            raise CoordinatorError(f"--days {days}: a certificate must be valid for at least 1 day", exit_codes.USAGE)
        if force:
            return
        active = self.active_certificates(name)
        if active:
            until = dt.datetime.fromtimestamp(active[-1].not_after, dt.UTC)
            raise CoordinatorError(
                f"{name!r} already has a valid certificate (serial {active[-1].serial:x}, until {until:%Y-%m-%d}): "
                f"to rotate it use `edge-coordinator renew {name} --csr FILE`; for a new device revoke it first "
                f"(`edge-coordinator revoke {name}`), or pass --force to issue a second one", exit_codes.USAGE)
        if self.is_revoked(name):
            raise CoordinatorError(f"{name!r} was revoked: pass --force to re-enroll it (a new certificate for the same id)",
                                   exit_codes.USAGE)

    def sign_csr(self, csr_pem: bytes, days: int = 365, force: bool = False) -> bytes:
        """Issue a client certificate for an agent's CSR (its key never leaves the device)."""
        try:
            csr = load_csr(csr_pem)
            name = common_name(csr)
        except PKIError as exc:
            raise CoordinatorError(str(exc)) from None
        self.check_issuable(name, days, force)
        return self._issue_client(csr, name, days)

    # -- renew: a new certificate for an id that already has one --
    def renew_agent(self, name: str, csr_pem: bytes, days: int = 365) -> bytes:
        """Issue a new certificate for an enrolled, unrevoked agent from its CSR.

        Why a separate path from enroll: a second valid certificate for an active id is
        exactly what enroll refuses without --force (two devices, one identity); renewal
        is the legitimate case, so it is allowed here, but only for an id this CA issued
        to and did not revoke, and only for a CSR that names that id. The old certificate
        is not revoked: the running agent keeps using it until it restarts with the new one
        (no downtime), and it simply expires."""
        try:
            csr = load_csr(csr_pem)
            cn = common_name(csr)
        except PKIError as exc:
            raise CoordinatorError(str(exc)) from None
        if cn != name:
            raise CoordinatorError(f"the CSR is for {cn!r}, not {name!r}: renew with the CSR of {name!r} "
                                   "(`edge-agent renew --csr` on that device)", exit_codes.USAGE)
        self._refuse_reserved(name)
        if days <= 0:
            raise CoordinatorError(f"--days {days}: a certificate must be valid for at least 1 day", exit_codes.USAGE)
        if not any(c.name == name for c in self.issued()):
            raise CoordinatorError(f"{name!r} was never enrolled: enroll it first (`edge-coordinator enroll CSR`)",
                                   exit_codes.USAGE)
        if self.is_revoked(name):
            raise CoordinatorError(f"{name!r} is revoked: renewal would undo that; re-enroll it deliberately with "
                                   "`edge-coordinator enroll CSR --force`", exit_codes.USAGE)
        return self._issue_client(csr, name, days)

    def _issue_client(self, csr: x509.CertificateSigningRequest, name: str, days: int) -> bytes:
        """Sign a client certificate for `name` from its checked CSR, keep it under issued/."""
        try:
            cert = self.ca().issue(csr, client=True, days=days)
        except PKIError as exc:
            raise CoordinatorError(str(exc)) from None
        target = self.dir / "issued" / f"{name}-{cert.serial_number:x}.pem"
        write_pem(cert, target)
        self._remember(target)
        return target.read_bytes()

    def renew_own(self, which: str, hosts: tuple[str, ...] = (), days: int = 365) -> Path:
        """Re-issue the coordinator's (`which` = its identity) or the broker's certificate with
        its existing key, written atomically over the old one.

        Same key: a running daemon or Mosquitto keeps a key that matches the new file, so
        nothing breaks between the write and the next (re)start. The broker keeps the host
        names of its current certificate plus `hosts` (the names devices connect to)."""
        from cryptography.hazmat.primitives import serialization

        from security.pki import load_private_key, make_csr

        if days <= 0:
            raise CoordinatorError(f"--days {days}: a certificate must be valid for at least 1 day", exit_codes.USAGE)
        broker = which == BROKER_IDENTITY
        cert_path = self.broker_cert if broker else self.cfg.cert_path
        key_path = self.broker_key if broker else self.cfg.key_path
        if hosts and not broker:
            raise CoordinatorError("--host is for the broker's certificate: `edge-coordinator renew broker --host NAME`",
                                   exit_codes.USAGE)
        try:
            key = load_private_key(key_path)
        except PKIError as exc:
            raise CoordinatorError(f"{exc}: `edge-coordinator init --repair` makes a new key and certificate") from None
        names = tuple(dict.fromkeys((*broker_hosts(cert_path), *BROKER_HOSTS, *hosts))) if broker else ()
        try:
            cert = self.ca().issue(make_csr(key, which), client=not broker, server=broker, hosts=names, days=days)
        except PKIError as exc:
            raise CoordinatorError(str(exc)) from None
        _atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._remember(cert_path)
        return cert_path

    def issue_peer(self, name: str, directory: Path, days: int = 365) -> Path:
        """A peer coordinator's certificate and key in `directory` (coordinator/peers.py), remembered
        in issued.json like every certificate of this CA (`revoke NAME` revokes it; then drop it from `peers`)."""
        try:
            cert_path, _ = issue_identity(self.ca(), directory, name, days=days)
        except PKIError as exc:
            raise CoordinatorError(str(exc)) from None
        self._remember(cert_path)
        return cert_path

    def _refuse_reserved(self, name: str) -> None:
        if name in (*self.cfg.coordinator_identities, *RESERVED_NAMES):
            raise CoordinatorError(f"identity {name!r} is reserved for the coordinator/broker: pick another agent name")

    def make_bundle(self, name: str, out: Path | None, broker_url: str, days: int = 365, force: bool = False) -> Path:
        """Demo convenience: key + CSR + cert for a simulated agent, plus agent.toml."""
        self.check_issuable(name, days, force)
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
        write_toml(out / "agent.toml", {"agent_id": name, "broker_url": broker_url, "ca_file": "ca.pem",
                                        "cert_file": f"{name}.pem", "key_file": f"{name}.key"},
                   header="edge-agent settings for this bundle (`edge-agent enroll --bundle DIR` installs them)")
        return out

    # -- revocation (security.revocation keeps the serials; we map names to serials) --
    def revocations(self) -> RevocationStore:
        return RevocationStore(self.revoked_path)

    def revoke(self, name: str) -> list[int]:
        """Revoke every certificate issued to `name` (an agent or a peer coordinator); rewrite the CRL.
        Returns the serials."""
        if name not in self.cfg.peers:
            self._refuse_reserved(name)
        issued = [c for c in self.issued() if c.name == name]
        if not issued:
            raise CoordinatorError(f"no certificate was issued to {name!r}: see `edge-coordinator agents`")
        store = self.revocations()
        for cert in issued:
            path = self._cert_file(cert)
            store.revoke(load_certificate(path) if path else cert.serial, reason="operator")
        store.write_crl(self.ca(), self.cfg.crl_path, days=self._crl_days())
        return [c.serial for c in issued]

    # -- CRL lifetime: re-issued before agents and Mosquitto would find it stale --
    def _crl_days(self) -> float:
        return self.cfg.pki.crl_validity / 86400.0

    def crl(self) -> x509.CertificateRevocationList:
        from security.revocation import load_crl

        try:
            return load_crl(self.cfg.crl_path)
        except PKIError as exc:
            raise CoordinatorError(f"{exc}: run `edge-coordinator init` or restore {self.cfg.crl_path}") from None

    def crl_due(self, now: dt.datetime | None = None) -> bool:
        """True when the CRL is older than pki.crl_refresh, or would expire within it."""
        now = now or dt.datetime.now(dt.UTC)
        crl = self.crl()
        refresh = dt.timedelta(seconds=self.cfg.pki.crl_refresh)
        next_update = crl.next_update_utc
        # last_update is back-dated 5 minutes by the CA: compare against issue time
        issued_at = crl.last_update_utc + dt.timedelta(minutes=5)
        return next_update is None or now - issued_at >= refresh or next_update - now <= refresh

    def reissue_crl(self) -> Path:
        """Same revocations, new validity window (written atomically)."""
        revoked = self.revocations().revoked() if self.revoked_path.exists() else {}
        self._write_crl(self.ca(), revoked)
        return self.cfg.crl_path

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
        write_crl_file(ca.crl(revoked, days=self._crl_days()), self.cfg.crl_path)

    def active_agents(self) -> list[str]:
        """Enrolled, unrevoked agent names (recipients of CRL pushes)."""
        reserved = {*self.cfg.coordinator_identities, *RESERVED_NAMES}
        names = sorted({c.name for c in self.issued() if c.name not in reserved})
        return [n for n in names if not self.is_revoked(n)]
