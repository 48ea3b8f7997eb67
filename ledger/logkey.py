"""The coordinator's transparency-log key: an Ed25519 signed-note key in the PKI dir.

Why a key of its own (not the coordinator's TLS key): checkpoints are C2SP signed
notes, verified by auditors and, later, cosigned by agents; the verifier key is a
one-line `vkey` string anyone can pin. The key name is the log's origin, a stable
name for this log: `edgeledger/<CA fingerprint, 16 hex>/<coordinator identity>`, so
several coordinators (or fleets) never share an origin.

Files: `log.key` (skey, 0600, never leaves the coordinator) and `log.pub` (vkey, public,
next to the CA and copied into enrollment bundles).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ledger.tlog.note import Ed25519Signer, Ed25519Verifier

KEY_NAME, PUB_NAME = "log.key", "log.pub"


class LogKeyError(RuntimeError):
    """The log key is missing, unreadable or does not belong to this log."""


def log_origin(ca_pem: bytes, identity: str) -> str:
    """The origin line: `edgeledger/<first 16 hex of the CA's SHA-256 DER fingerprint>/<identity>`."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]
    return f"edgeledger/{fingerprint}/{identity}"


def ensure_log_key(pki_dir: Path, origin: str) -> Ed25519Signer:
    """Load `pki_dir/log.key`, or create it (0600) and `log.pub` when absent.

    Refuses a key whose name is not `origin`: checkpoints would carry the wrong log name.
    """
    key_path, pub_path = pki_dir / KEY_NAME, pki_dir / PUB_NAME
    if key_path.exists():
        try:
            signer = Ed25519Signer.from_skey(key_path.read_text().strip())
        except Exception as exc:  # noqa: BLE001 - any parse failure: the file is not a note key
            raise LogKeyError(f"{key_path} is not a signed-note Ed25519 key ({exc}): restore it from backup") from None
        if signer.name != origin:
            raise LogKeyError(f"{key_path} signs for log {signer.name!r}, not {origin!r}: the CA or identity "
                              "changed; restore the original CA/identity or move the old key away")
        if not pub_path.exists():
            pub_path.write_text(signer.verifier().vkey + "\n")
        return signer
    pki_dir.mkdir(parents=True, exist_ok=True)
    signer = Ed25519Signer.generate(origin)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(signer.skey + "\n")
    pub_path.write_text(signer.verifier().vkey + "\n")
    return signer


def load_verifier(source: str | Path) -> Ed25519Verifier:
    """The log's verifier from a vkey file, or from a vkey string given directly.

    A string is never turned into a Path first: vkeys contain '/' and Path would fold '//'.
    """
    if isinstance(source, str) and "+" in source and not os.path.exists(source):
        vkey = source.strip()
    else:
        try:
            vkey = Path(source).read_text().strip()
        except OSError as exc:
            raise LogKeyError(f"cannot read log key {source}: {exc.strerror}") from None
    try:
        return Ed25519Verifier.from_vkey(vkey)
    except Exception as exc:  # noqa: BLE001
        raise LogKeyError(f"{source} is not a signed-note verifier key: {exc}") from None
