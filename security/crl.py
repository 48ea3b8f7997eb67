"""CRL freshness and installation: what an agent may accept as its new CRL.

Why: a CRL is only as good as its age. The fleet CA signs it with a `next_update`;
past that moment the list may miss revocations, so a verifier must fail closed
instead of trusting an old copy forever. The coordinator re-issues the CRL before it
goes stale and pushes it to agents (`edge.agent.update_crl`); the agent installs it
only if the fleet CA signed it, it is fresh, and it is not older than the one it has
(no rollback to a list that predates a revocation). The CRL is self-authenticating
(CA signature), so installing it does not depend on trusting the message carrying it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .pki import PKIError, load_certificate, utcnow

#: Key types a CA may sign a CRL with (what cryptography verifies CRL signatures with).
CRL_SIGNER_KEYS = (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)

#: Clock skew tolerated on `last_update` (the CA back-dates it by 5 minutes itself).
CLOCK_SKEW = dt.timedelta(minutes=10)


class CrlError(PKIError):
    """A CRL is unusable: not the fleet CA's, stale, older than the installed one."""


class CrlStale(CrlError):
    """The CRL is past its next_update: revocations issued since may be missing."""


def parse_crl(data: bytes) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise CrlError(f"not a PEM CRL ({exc}): send the fleet's crl.pem") from None


def check_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate, *, where: str = "CRL") -> None:
    """Raise CrlError unless the fleet CA `ca` issued and signed `crl`."""
    if crl.issuer != ca.subject:
        raise CrlError(f"{where} issuer {crl.issuer.rfc4514_string()} is not the fleet CA {ca.subject.rfc4514_string()}: "
                       "it is not signed by the fleet CA; regenerate it with the CA")
    key = ca.public_key()
    try:
        ok = isinstance(key, CRL_SIGNER_KEYS) and crl.is_signature_valid(key)
    except (InvalidSignature, TypeError, ValueError):
        ok = False
    if not ok:
        raise CrlError(f"{where} is not signed by the fleet CA (signature does not verify): regenerate it with the CA")


def check_fresh(crl: x509.CertificateRevocationList, now: dt.datetime | None = None, *, where: str = "CRL") -> None:
    """Raise CrlStale past next_update (or without one), CrlError when issued in the future."""
    now = now or utcnow()
    next_update = crl.next_update_utc
    if next_update is None:
        raise CrlStale(f"{where} has no next-update time: the fleet CA must issue CRLs with one")
    if now >= next_update:
        raise CrlStale(
            f"{where} expired at {next_update.isoformat()} (next-update passed): revocations since then may be "
            "missing; wait for the coordinator to push a fresh CRL (edge-coordinator run re-issues it) or re-enroll"
        )
    if crl.last_update_utc - CLOCK_SKEW > now:
        raise CrlError(f"{where} was issued in the future ({crl.last_update_utc.isoformat()}): check this device's clock")


def load_verified_crl(path: Path | str, ca_path: Path | str, now: dt.datetime | None = None) -> x509.CertificateRevocationList:
    """The CRL at `path`, signed by the CA at `ca_path` and fresh; CrlError/CrlStale otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CrlError(f"no CRL at {path}: re-enroll with a bundle that has crl.pem, or wait for the coordinator's push") from None
    crl = parse_crl(data)
    check_signed_by(crl, load_certificate(Path(ca_path)))
    check_fresh(crl, now, where=f"CRL {path}")
    return crl


def lists_serial(crl: x509.CertificateRevocationList, serial: int) -> bool:
    return crl.get_revoked_certificate_by_serial_number(serial) is not None


def install_crl(crl_pem: bytes | str, ca_path: Path | str, crl_path: Path | str,
                now: dt.datetime | None = None) -> tuple[x509.CertificateRevocationList, bool]:
    """Verify a pushed CRL and write it atomically over `crl_path`.

    Returns (crl, replaced). Refuses (CrlError) a CRL not signed by the fleet CA, a
    stale one, or one older than the installed CRL; an identical or equally old one
    is not written again (replaced=False).
    """
    data = crl_pem.encode() if isinstance(crl_pem, str) else bytes(crl_pem)
    crl = parse_crl(data)
    check_signed_by(crl, load_certificate(Path(ca_path)))
    check_fresh(crl, now, where="pushed CRL")
    crl_path = Path(crl_path)
    if crl_path.exists():
        try:
            current = parse_crl(crl_path.read_bytes())
        except CrlError:
            current = None  # a corrupt local copy is replaced by a verified one
        if current is not None:
            if crl.last_update_utc < current.last_update_utc:
                raise CrlError(
                    f"pushed CRL ({crl.last_update_utc.isoformat()}) is older than the installed one "
                    f"({current.last_update_utc.isoformat()}): refusing a rollback"
                )
            if current.fingerprint(hashes.SHA256()) == crl.fingerprint(hashes.SHA256()):
                return crl, False
    from .revocation import write_crl_file  # the coordinator's revocation store: not on the agent's start path

    write_crl_file(crl, crl_path)
    return crl, True

