"""C2SP transparency log checkpoints (https://c2sp.org/tlog-checkpoint).

The note text is at least three non-empty lines: the origin (the log's identity), the
tree size in ASCII decimal without leading zeroes, the base64 RFC 6962 root hash, then
optional non-empty extension lines. A checkpoint is signed as a signed note, by the log
key (whose name should be the origin) and optionally cosigned by witnesses.

Why strict parsing: two byte strings must never parse to the same checkpoint (one
encoding per tree head), or a witness and an auditor could disagree on what was signed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ledger.tlog.errors import MalformedCheckpointError, UnverifiedNoteError
from ledger.tlog.merkle import HASH_SIZE
from ledger.tlog.note import (
    Note,
    Signer,
    Verifier,
    b64decode_strict,
    b64encode,
    open_note,
    sign_note,
)

_DECIMAL = re.compile(r"0|[1-9][0-9]*")
MAX_TREE_SIZE = 2**64 - 1


def _check_line(value: str, what: str) -> None:
    if not value:
        raise MalformedCheckpointError(f"{what} must not be empty")
    for ch in value:
        if ord(ch) < 0x20:
            raise MalformedCheckpointError(f"{what} contains control character {ch!r}")


@dataclass(frozen=True)
class Checkpoint:
    """A log's signed tree head: origin, tree size, root hash, extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line(self.origin, "origin")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 0 <= self.size <= MAX_TREE_SIZE:
            raise MalformedCheckpointError(f"tree size must be an integer in [0, 2**64), got {self.size!r}")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise MalformedCheckpointError(f"root hash must be {HASH_SIZE} bytes")
        for line in self.extensions:
            _check_line(line, "extension line")

    def body(self) -> str:
        """The note text: every line newline-terminated."""
        lines = [self.origin, str(self.size), b64encode(self.root_hash), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse note text strictly; raise MalformedCheckpointError naming the bad line."""
        if not text.endswith("\n"):
            raise MalformedCheckpointError("checkpoint text must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedCheckpointError(
                f"checkpoint needs origin, size and root hash lines, got {len(lines)} line(s)"
            )
        origin, size_line, root_line, *extensions = lines
        for number, line in enumerate(lines, start=1):
            if not line:
                raise MalformedCheckpointError(f"checkpoint line {number} is empty")
        if not _DECIMAL.fullmatch(size_line):
            raise MalformedCheckpointError(
                f"tree size {size_line[:30]!r} must be ASCII decimal without leading zeroes"
            )
        size = int(size_line)
        if size > MAX_TREE_SIZE:
            raise MalformedCheckpointError(f"tree size {size_line} does not fit in 64 bits")
        root = b64decode_strict(root_line, "root hash", MalformedCheckpointError)
        if len(root) != HASH_SIZE:
            raise MalformedCheckpointError(f"root hash must be {HASH_SIZE} bytes, got {len(root)}")
        return cls(origin, size, root, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> str:
    """The signed note of `checkpoint` by the log key."""
    return sign_note(checkpoint.body(), [signer])


def open_checkpoint(
    message: bytes | str,
    log_verifier: Verifier,
    origin: str | None = None,
    others: tuple[Verifier, ...] = (),
) -> tuple[Checkpoint, Note]:
    """Verify a signed checkpoint: the log key must have signed it and the origin match.

    `others` (e.g. witness cosignature verifiers) are verified too when present; a bad
    signature by any known key rejects the checkpoint (fail closed).
    """
    note = open_note(message, (log_verifier, *others))
    if not note.signed_by(log_verifier.name, log_verifier.key_id):
        raise UnverifiedNoteError(
            f"checkpoint is not signed by the log key {log_verifier.name}+{log_verifier.key_id:08x}"
        )
    checkpoint = Checkpoint.parse(note.text)
    expected = log_verifier.name if origin is None else origin
    if checkpoint.origin != expected:
        raise MalformedCheckpointError(
            f"checkpoint origin {checkpoint.origin!r} is not the expected {expected!r}: wrong log"
        )
    return checkpoint, note
