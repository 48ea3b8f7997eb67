"""The signed envelope: exact payload bytes + signature + signer certificate.

Why: the envelope is what gets stored and audited later, so it is self-contained
(the certificate travels inside) and the signature covers the exact payload bytes,
with no canonicalisation step to get wrong. Format (UTF-8 JSON object):

    {"v": 1, "alg": "ES256"|"RS256", "cert": "<PEM>", "sig": "<base64>", "payload": "<base64>"}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from .pki import PrivateKey
from .signing import SignatureRefused, SigningError

VERSION = 1
ALGORITHMS = ("ES256", "RS256")


@dataclass(frozen=True)
class Envelope:
    raw: bytes
    alg: str
    certificate_pem: str
    signature: bytes
    payload: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


def algorithm_for(key: PrivateKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if not isinstance(key.curve, ec.SECP256R1):
            raise SigningError(f"EC keys must use P-256, not {key.curve.name}: regenerate the key")
        return "ES256"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        if key.key_size < 2048:
            raise SigningError(f"RSA keys must be at least 2048 bits, not {key.key_size}")
        return "RS256"
    raise SigningError(f"unsupported key type {type(key).__name__}: use EC P-256 or RSA")


# ECDSA signatures are malleable ((r, s) and (r, n - s) both verify); signing emits the
# low-s form and verification refuses the other, so a valid envelope has one encoding.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        if s > P256_ORDER // 2:
            s = P256_ORDER - s
        return encode_dss_signature(r, s)
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def sign_envelope(key: PrivateKey, certificate_pem: str, payload: bytes) -> bytes:
    """Sign `payload` with `key`; the certificate must hold the matching public key."""
    alg = algorithm_for(key)
    doc = {
        "v": VERSION,
        "alg": alg,
        "cert": certificate_pem,
        "sig": base64.b64encode(_sign(key, payload)).decode(),
        "payload": base64.b64encode(payload).decode(),
    }
    return _canonical(doc)


def parse_envelope(data: bytes | str, max_bytes: int | None = None) -> Envelope:
    """Parse without verifying; raises SignatureRefused('oversize'|'malformed')."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if max_bytes is not None and len(raw) > max_bytes:
        raise SignatureRefused("oversize", f"message of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SignatureRefused("malformed", f"envelope is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise SignatureRefused("malformed", f"envelope is not a version {VERSION} object")
    alg, cert, sig, payload = doc.get("alg"), doc.get("cert"), doc.get("sig"), doc.get("payload")
    if alg not in ALGORITHMS or not (isinstance(cert, str) and isinstance(sig, str) and isinstance(payload, str)):
        raise SignatureRefused("malformed", "envelope lacks alg/cert/sig/payload or uses an unknown algorithm")
    try:
        signature = base64.b64decode(sig, validate=True)
        body = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureRefused("malformed", f"envelope sig/payload is not base64: {exc}") from None
    canonical = {"v": VERSION, "alg": alg, "cert": cert, "sig": sig, "payload": payload}
    if _canonical(canonical) != raw:
        raise SignatureRefused("malformed", "envelope is not in canonical form (re-encoded or padded in transit)")
    if base64.b64encode(signature).decode() != sig or base64.b64encode(body).decode() != payload:
        raise SignatureRefused("malformed", "envelope sig/payload is not canonical base64")
    return Envelope(raw=raw, alg=alg, certificate_pem=cert, signature=signature, payload=body)


class CertificateCache:
    """Parsed signer certificates by their canonical PEM text (a fleet has few signers,
    and parsing one costs more than checking a signature). One per verifier or audit
    run, not module state: its owner decides its lifetime."""

    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        self._certs: dict[str, x509.Certificate] = {}
        self._lock = threading.Lock()

    def get(self, certificate_pem: str) -> x509.Certificate | None:
        return self._certs.get(certificate_pem)

    def put(self, certificate_pem: str, cert: x509.Certificate) -> None:
        with self._lock:
            if len(self._certs) > self.MAX_ENTRIES:
                self._certs.clear()
            self._certs[certificate_pem] = cert


def load_envelope_certificate(certificate_pem: str, strict: bool = True,
                              cache: CertificateCache | None = None) -> x509.Certificate:
    """Parse (and, given a cache, cache) a signer certificate.

    strict: the PEM must be exactly what `certificate_pem()` emits, so an envelope has a
    single valid byte encoding (PEM parsers tolerate reflowed or trimmed text).
    """
    cert = cache.get(certificate_pem) if cache is not None else None
    if cert is None:
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem.encode())
            # cryptography parses some fields lazily: touch them now so a malformed
            # certificate is refused here, not deep inside a later check.
            cert.issuer, cert.subject, cert.extensions, cert.public_key(), cert.not_valid_after_utc
            canonical = cert.public_bytes(serialization.Encoding.PEM).decode()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise SignatureRefused("malformed", f"signer certificate is not valid PEM/DER: {exc}") from None
        if strict and canonical != certificate_pem:
            raise SignatureRefused("malformed", "signer certificate PEM is not in canonical form")
        if cache is not None and canonical == certificate_pem:  # only canonical text is cached
            cache.put(certificate_pem, cert)
    return cert


def check_signature(env: Envelope, cert: x509.Certificate) -> None:
    """Raise SignatureRefused('bad_signature') unless `cert`'s key signed the payload."""
    public_key = cert.public_key()
    try:
        expected = algorithm_for(public_key)  # type: ignore[arg-type]
    except SigningError as exc:
        raise SignatureRefused("bad_signature", str(exc)) from None
    if env.alg != expected:
        raise SignatureRefused("bad_signature", f"envelope says {env.alg} but the certificate key needs {expected}")
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            try:
                _, s = decode_dss_signature(env.signature)
            except ValueError:
                raise SignatureRefused("bad_signature", "signature is not a DER ECDSA signature") from None
            if s > P256_ORDER // 2:
                raise SignatureRefused("bad_signature", "ECDSA signature is not in low-s form (altered in transit)")
            public_key.verify(env.signature, env.payload, ec.ECDSA(hashes.SHA256()))
        else:
            assert isinstance(public_key, rsa.RSAPublicKey)
            public_key.verify(env.signature, env.payload, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise SignatureRefused("bad_signature", "signature does not match the payload: message was altered") from None


def verify_envelope_signature(envelope: bytes, certificate_pem: str, cache: CertificateCache | None = None) -> None:
    """Re-verify a stored envelope against a known certificate (no Celery needed).

    Raises SignatureRefused when the envelope is malformed, was signed by another key,
    or was altered. Certificate trust (chain, CRL) is the caller's business here: an
    auditor checks a historic signature with the certificate registered at the time.
    cache: parsed certificates to reuse across calls (an audit run checks many
    envelopes of few signers).
    """
    env = parse_envelope(envelope)
    cert = load_envelope_certificate(certificate_pem, strict=False, cache=cache)
    check_signature(env, cert)


def certificate_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def signed_payload(envelope: bytes) -> dict:
    """The signed content of an envelope: {"kind", "sent_at", "nonce", "meta", "body"}.

    For tasks, `meta` holds the signed task name/id/eta/expires/retries and `body` is
    [args, kwargs, embed]. Does NOT verify: call verify_envelope_signature first.
    """
    from kombu.utils import json as kjson

    try:
        doc = kjson.loads(parse_envelope(envelope).payload)
    except ValueError as exc:
        raise SignatureRefused("malformed", f"signed payload is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SignatureRefused("malformed", "signed payload is not an object")
    return doc
