"""C2SP checkpoint cosignatures, Ed25519 v1 (https://c2sp.org/tlog-cosignature).

A cosignature is a note signature line on a checkpoint by a witness (here: an agent).
- key ID = SHA-256(<name> || "\\n" || 0x04 || 32-byte Ed25519 public key)[:4]
- signature bytes after the key ID = timestamped_signature:
  u64 big-endian POSIX timestamp (<= 2**63 - 1) || 64-byte Ed25519 signature
- signed message = "cosignature/v1\\n" + "time <timestamp>\\n" + the whole checkpoint
  note text (final newline included, signature lines excluded).

Why its own key type: the message is not the note text, so a witness key must never
double as a log key (0x01): the type byte in the key ID keeps the two apart. The
Ed25519 message does not commit to the cosigner name, so each cosigner needs its own key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.tlog.checkpoint import Checkpoint, open_checkpoint
from ledger.tlog.errors import CosignatureError, TlogError, UnverifiedNoteError
from ledger.tlog.note import (
    Ed25519KeySigner,
    Ed25519KeyVerifier,
    Note,
    Signature,
    Verifier,
)

SIG_COSIGNATURE_V1 = 0x04
HEADER = "cosignature/v1\n"
MAX_TIMESTAMP = 2**63 - 1
TIMESTAMPED_SIGNATURE_SIZE = 8 + 64


def cosigned_message(body: str, timestamp: int) -> bytes:
    """The exact bytes an Ed25519 v1 cosignature signs, for a checkpoint note text."""
    Checkpoint.parse(body)  # only checkpoints are cosigned
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp <= MAX_TIMESTAMP:
        raise CosignatureError(f"cosignature timestamp must be an integer in [0, 2**63), got {timestamp!r}")
    return f"{HEADER}time {timestamp}\n{body}".encode()


def cosignature_timestamp(sig: Signature) -> int:
    """The POSIX timestamp inside a v1 cosignature (only meaningful once verified)."""
    if len(sig.signature) != TIMESTAMPED_SIGNATURE_SIZE:
        raise CosignatureError(
            f"signature by {sig.name!r} is {len(sig.signature)} bytes, a v1 cosignature is {TIMESTAMPED_SIGNATURE_SIZE}"
        )
    return int.from_bytes(sig.signature[:8], "big")


class CosignatureV1Verifier(Ed25519KeyVerifier):
    """Verifies Ed25519 v1 cosignatures (type 0x04) of one witness."""

    sig_type = SIG_COSIGNATURE_V1
    kind = "witness key"

    def verify(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != TIMESTAMPED_SIGNATURE_SIZE:
            return False
        timestamp = int.from_bytes(signature[:8], "big")
        try:
            signed = cosigned_message(message.decode("utf-8"), timestamp)
            self._key.verify(signature[8:], signed)
        except (UnicodeDecodeError, TlogError, InvalidSignature):
            return False
        return True


class CosignatureV1Signer(Ed25519KeySigner):
    """A witness key producing Ed25519 v1 cosignatures; `clock` gives POSIX seconds."""

    sig_type = SIG_COSIGNATURE_V1
    verifier_class = CosignatureV1Verifier

    def __init__(
        self, name: str, private_key: Ed25519PrivateKey, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(name, private_key)
        self._clock = clock

    @classmethod
    def generate(cls, name: str, clock: Callable[[], float] = time.time) -> CosignatureV1Signer:
        return cls(name, Ed25519PrivateKey.generate(), clock)

    @classmethod
    def from_skey(cls, skey: str, clock: Callable[[], float] = time.time) -> CosignatureV1Signer:
        """Parse `PRIVATE+KEY+<name>+<hex id>+<base64(0x04 || 32-byte seed)>`."""
        name, hex_id, key = cls._from_seed(skey)
        return cls(name, key, clock)._check_id(hex_id)

    def verifier(self) -> CosignatureV1Verifier:
        assert isinstance(self._verifier, CosignatureV1Verifier)
        return self._verifier

    def sign_at(self, message: bytes, timestamp: int) -> bytes:
        """timestamped_signature over a checkpoint note text at `timestamp`."""
        try:
            body = message.decode("utf-8")
        except UnicodeDecodeError:
            raise CosignatureError("cosigned note text must be UTF-8") from None
        signed = cosigned_message(body, timestamp)
        return timestamp.to_bytes(8, "big") + self._key.sign(signed)

    def sign(self, message: bytes) -> bytes:
        return self.sign_at(message, int(self._clock()))

    def cosign(self, checkpoint: Checkpoint, timestamp: int | None = None) -> Signature:
        """The cosignature line for `checkpoint` (now, unless a timestamp is given)."""
        ts = int(self._clock()) if timestamp is None else timestamp
        return Signature(self.name, self.key_id, self.sign_at(checkpoint.body().encode("utf-8"), ts))


@dataclass(frozen=True)
class CosignedCheckpoint:
    """A checkpoint verified under the log key plus the witnesses that cosigned it."""

    checkpoint: Checkpoint
    note: Note
    cosigned_at: dict[str, int]  # witness name -> cosignature timestamp


def open_cosigned_checkpoint(
    message: bytes | str,
    log_verifier: Verifier,
    witnesses: Sequence[CosignatureV1Verifier],
    quorum: int,
    origin: str | None = None,
) -> CosignedCheckpoint:
    """Verify a checkpoint's log signature and require `quorum` distinct witness cosignatures.

    Any signature by a configured key that fails rejects the whole checkpoint.
    """
    if not 0 <= quorum <= len(witnesses):
        raise ValueError(f"quorum {quorum} must be between 0 and the {len(witnesses)} configured witnesses")
    if len({w.name for w in witnesses}) != len(witnesses):
        raise ValueError("two configured witnesses share a name: give each cosigner its own name")
    checkpoint, note = open_checkpoint(message, log_verifier, origin, others=tuple(witnesses))
    wanted = {(w.name, w.key_id) for w in witnesses}
    cosigned = {s.name: cosignature_timestamp(s) for s in note.signatures if (s.name, s.key_id) in wanted}
    if len(cosigned) < quorum:
        raise UnverifiedNoteError(
            f"checkpoint of size {checkpoint.size} has {len(cosigned)} valid witness cosignature(s), "
            f"{quorum} required: wait for more witnesses to cosign",
            note,
        )
    return CosignedCheckpoint(checkpoint, note, cosigned)
