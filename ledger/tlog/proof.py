"""C2SP tlog proofs (https://c2sp.org/tlog-proof): an offline-verifiable inclusion bundle.

Text format, lines separated by newlines:
    c2sp.org/tlog-proof@v1
    extra <base64>            (optional, opaque, NOT authenticated)
    index <decimal, no leading zeroes>
    <base64 hash>             (zero or more: the RFC 6962 inclusion path, leaf sibling first)
    <empty line>
    <the signed checkpoint, verbatim>

Why a bundle: an auditor holding only the log's and witnesses' public keys can check
that one execution record is in the log the witnesses saw, with no access to the
coordinator.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ledger.tlog.checkpoint import Checkpoint
from ledger.tlog.cosignature import CosignatureV1Verifier, CosignedCheckpoint, open_cosigned_checkpoint
from ledger.tlog.errors import MalformedProofBundleError
from ledger.tlog.merkle import HASH_SIZE, verify_inclusion
from ledger.tlog.note import Verifier, b64decode_strict, b64encode

HEADER = "c2sp.org/tlog-proof@v1"
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True)
class ProofBundle:
    index: int
    inclusion_proof: tuple[bytes, ...]
    checkpoint: str  # the signed checkpoint note, verbatim
    extra: bytes | None = None

    def format(self) -> str:
        lines = [HEADER]
        if self.extra is not None:
            lines.append(f"extra {b64encode(self.extra)}")
        lines.append(f"index {self.index}")
        lines.extend(b64encode(h) for h in self.inclusion_proof)
        return "\n".join(lines) + "\n\n" + self.checkpoint

    @classmethod
    def parse(cls, text: str | bytes) -> ProofBundle:
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedProofBundleError("tlog proof is not valid UTF-8") from None
        head, sep, checkpoint = text.partition("\n\n")
        if not sep:
            raise MalformedProofBundleError("tlog proof has no empty line before the checkpoint")
        lines = head.split("\n")
        if lines[0] != HEADER:
            raise MalformedProofBundleError(f"tlog proof must start with {HEADER!r}, got {lines[0][:60]!r}")
        pos = 1
        extra = None
        if pos < len(lines) and lines[pos].startswith("extra "):
            extra = b64decode_strict(lines[pos][len("extra ") :], "extra data", MalformedProofBundleError)
            pos += 1
        if pos >= len(lines) or not lines[pos].startswith("index "):
            raise MalformedProofBundleError("tlog proof needs an 'index <n>' line after the header")
        number = lines[pos][len("index ") :]
        if not _DECIMAL.fullmatch(number) or int(number) >= 2**64:
            raise MalformedProofBundleError(f"index {number[:30]!r} must be a decimal without leading zeroes")
        hashes = []
        for line in lines[pos + 1 :]:
            digest = b64decode_strict(line, "inclusion proof hash", MalformedProofBundleError)
            if len(digest) != HASH_SIZE:
                raise MalformedProofBundleError(f"inclusion proof hash must be {HASH_SIZE} bytes, got {len(digest)}")
            hashes.append(digest)
        if not checkpoint:
            raise MalformedProofBundleError("tlog proof has no checkpoint after the empty line")
        return cls(int(number), tuple(hashes), checkpoint, extra)


@dataclass(frozen=True)
class VerifiedProof:
    bundle: ProofBundle
    cosigned: CosignedCheckpoint

    @property
    def checkpoint(self) -> Checkpoint:
        return self.cosigned.checkpoint


def verify_proof_bundle(
    text: str | bytes,
    leaf: bytes,
    log_verifier: Verifier,
    witnesses: Sequence[CosignatureV1Verifier] = (),
    quorum: int = 0,
    origin: str | None = None,
) -> VerifiedProof:
    """tlog-proof §Verifying: log signature, `quorum` witness cosignatures, inclusion of `leaf`.

    `leaf` is the RFC 6962 leaf hash the verifier computed itself from the record.
    """
    bundle = ProofBundle.parse(text)
    cosigned = open_cosigned_checkpoint(bundle.checkpoint, log_verifier, witnesses, quorum, origin)
    cp = cosigned.checkpoint
    verify_inclusion(leaf, bundle.index, cp.size, bundle.inclusion_proof, cp.root_hash)
    return VerifiedProof(bundle, cosigned)
