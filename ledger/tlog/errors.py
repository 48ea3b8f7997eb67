"""One exception family for the transparency-log library.

Why a shared base: callers (journal, witnesses, auditors) want one `except TlogError`
that fails closed, and the subclasses say which check failed so the message can tell
the user what to fix.
"""

from __future__ import annotations


class TlogError(Exception):
    """Base of every error raised by ledger.tlog."""


class ProofError(TlogError):
    """A Merkle proof (or the request for one) is invalid."""


class InclusionProofError(ProofError):
    """An inclusion proof does not bind the leaf hash to the root hash."""


class ConsistencyProofError(ProofError):
    """A consistency proof does not show the second tree extends the first."""


class NoteError(TlogError):
    """A signed note could not be parsed, signed or verified."""


class MalformedNoteError(NoteError):
    """The note text or a signature line breaks the c2sp.org/signed-note format."""


class KeyFormatError(NoteError):
    """A verifier or signer key string is malformed or inconsistent."""


class UnverifiedNoteError(NoteError):
    """No signature from a known key is present on the note.

    `note` holds the parsed, untrusted note so a caller can report who did sign it.
    """

    def __init__(self, message: str, note: object = None) -> None:
        super().__init__(message)
        self.note = note


class InvalidSignatureError(NoteError):
    """A signature from a known key failed to verify: the whole note is rejected."""


class AmbiguousKeyError(NoteError):
    """Two configured verifiers share both name and key ID."""


class MalformedCheckpointError(TlogError):
    """The note text is not a c2sp.org/tlog-checkpoint."""


class CosignatureError(NoteError):
    """A cosignature is malformed or cannot be produced."""


class MalformedProofBundleError(TlogError):
    """The text is not a c2sp.org/tlog-proof."""
