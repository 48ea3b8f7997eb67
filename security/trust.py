"""Certificate trust: chain to the fleet CA, validity window both ways, CRL.

Why: stock celery.security trusts any certificate found in a folder (even a CA cert)
and never checks not_valid_before. Here a signer must chain to the CA, be inside its
validity window now, carry clientAuth, and not be on the CRL.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from .crl import check_signed_by
from .pki import PKIError, common_name, load_certificate, utcnow
from .revocation import load_crl
from .signing import SignatureRefused


@dataclass(frozen=True)
class TrustedSigner:
    cert: x509.Certificate
    agent_id: str
    fingerprint: str
    certificate_pem: str
    not_before: dt.datetime
    not_after: dt.datetime
    serial: int


class TrustStore:
    """Validates signer certificates; results are cached per certificate.

    The cache keeps only what cannot change (chain and usage); the validity window
    and the CRL are re-checked on every call, and the CRL file is re-read whenever its
    modification time changes.
    """

    def __init__(self, ca_path: Path | str, crl_path: Path | str | None = None, cache_size: int = 4096) -> None:
        self.ca_path = Path(ca_path)
        self.ca = load_certificate(self.ca_path)
        self.crl_path = Path(crl_path) if crl_path else None
        self._store = Store([self.ca])
        self._cache: dict[object, TrustedSigner] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._crl_stamp: tuple[int, int, int] | None = None
        self._revoked: frozenset[int] = frozenset()
        self._generation = 0  # bumped whenever a changed CRL is loaded
        if self.crl_path:
            self._reload_crl()

    # -- CRL ---------------------------------------------------------------
    def _reload_crl(self) -> None:
        assert self.crl_path is not None
        try:
            st = os.stat(self.crl_path)
        except FileNotFoundError as exc:
            raise PKIError(f"CRL {self.crl_path} not found: write one with RevocationStore.write_crl") from exc
        # The inode too: `revoke` replaces the file (rename), which may keep size and,
        # on a coarse clock, mtime.
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._crl_stamp:
            return
        crl = load_crl(self.crl_path)
        check_signed_by(crl, self.ca, where=f"CRL {self.crl_path}")
        self._revoked = frozenset(r.serial_number for r in crl)
        self._crl_stamp = stamp
        self._generation += 1

    def crl_generation(self) -> int:
        """Changes whenever the CRL file changed (re-read now): verdicts cached under an
        older generation must be re-checked."""
        if self.crl_path is None:
            return 0
        with self._lock:
            self._reload_crl()
            return self._generation

    def is_revoked(self, serial: int) -> bool:
        if self.crl_path is None:
            return False
        with self._lock:
            self._reload_crl()
            return serial in self._revoked

    # -- validation --------------------------------------------------------
    def validate(self, cert: x509.Certificate, now: dt.datetime | None = None,
                 cache_key: object | None = None) -> TrustedSigner:
        """Return the trusted signer or raise SignatureRefused with a precise reason.

        cache_key: anything that identifies the certificate exactly (its canonical PEM
        text); saves hashing the DER on every message.
        """
        now = now or utcnow()
        der_fp = cache_key if cache_key is not None else cert.fingerprint(hashes.SHA256())
        signer = self._cache.get(der_fp)
        if signer is None:
            try:
                signer = self._validate_chain(cert, now)
            except (ValueError, UnsupportedAlgorithm) as exc:  # a lazily parsed field is malformed
                raise SignatureRefused("cert_untrusted", f"signer certificate cannot be parsed: {exc}") from None
        if now < signer.not_before:
            raise SignatureRefused("cert_not_yet_valid", f"signer certificate is valid only from {signer.not_before.isoformat()}")
        if now > signer.not_after:
            raise SignatureRefused("cert_expired", f"signer certificate expired at {signer.not_after.isoformat()}")
        if self.is_revoked(signer.serial):
            raise SignatureRefused("cert_revoked", f"signer certificate {signer.agent_id} (serial {signer.serial:x}) is revoked")
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[der_fp] = signer
        return signer

    def _validate_chain(self, cert: x509.Certificate, now: dt.datetime) -> TrustedSigner:
        nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
        if cert.issuer == cert.subject:
            raise SignatureRefused("cert_untrusted", "signer certificate is self-signed: enroll with the fleet CA")
        if cert.issuer != self.ca.subject:
            raise SignatureRefused("cert_untrusted", "signer certificate was not issued by the fleet CA")
        if not (nb <= now <= na):
            # Outside its window: the policy verifier would only say "not valid at validation
            # time". Check that the CA really issued it, then report the precise reason.
            try:
                cert.verify_directly_issued_by(self.ca)
            except (ValueError, TypeError, InvalidSignature):
                raise SignatureRefused("cert_untrusted", "signer certificate was not signed by the fleet CA") from None
            if now < nb:
                raise SignatureRefused("cert_not_yet_valid", f"signer certificate is valid only from {nb.isoformat()}")
            raise SignatureRefused("cert_expired", f"signer certificate expired at {na.isoformat()}")
        verifier = PolicyBuilder().store(self._store).time(now).build_client_verifier()
        try:
            verifier.verify(cert, [])
        except VerificationError as exc:
            raise SignatureRefused("cert_untrusted", f"signer certificate does not chain to the fleet CA: {exc}") from None
        try:
            agent_id = common_name(cert)
        except PKIError as exc:
            raise SignatureRefused("cert_untrusted", str(exc)) from None
        return TrustedSigner(
            cert=cert, agent_id=agent_id, fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            not_before=nb, not_after=na, serial=cert.serial_number,
        )
