"""C2SP signed notes (https://c2sp.org/signed-note): text signed by one or more keys.

Format: the text (valid UTF-8, no ASCII control characters but newline, ending in a
newline), one empty line, then one or more lines "— <key name> base64(key ID || sig)".
The text is separated from the signatures by the LAST empty line, so the text itself
may contain empty lines. Key names are non-empty with no Unicode space and no '+'.
Key ID = first 4 bytes (big-endian uint32) of SHA-256(name || 0x0A || type || key).

Why verification fails closed: a note is only trusted through a known key (name AND
key ID must both match); a known key whose signature does not verify rejects the whole
note, and a note with no verified known signature is rejected (signed-note §Signatures).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger.tlog.errors import (
    AmbiguousKeyError,
    InvalidSignatureError,
    KeyFormatError,
    MalformedNoteError,
    UnverifiedNoteError,
)

SIG_ED25519 = 0x01
MAX_SIGNATURES = 100  # the spec requires accepting at least 16
SIG_PREFIX = "\u2014 "  # em dash, space
_HEX_ID = re.compile(r"[0-9a-f]{8}")


def key_id(name: str, key_material: bytes) -> int:
    """Key ID of `key_material` (= signature type byte || public key) under `name`."""
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + key_material).digest()
    return int.from_bytes(digest[:4], "big")


def is_valid_key_name(name: str) -> bool:
    """Non-empty, no Unicode space, no '+', no control character (signed-note §Format)."""
    return (
        bool(name)
        and "+" not in name
        and not any(c.isspace() or ord(c) < 0x20 for c in name)
    )


def b64decode_strict(value: str, what: str, error: type[Exception]) -> bytes:
    """Standard padded base64 (RFC 4648 §4), canonical only: one encoding per value."""
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise error(f"{what} is not standard base64: {value[:60]!r}") from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise error(f"{what} is not canonical base64: {value[:60]!r}")
    return raw


def b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedNoteError(f"{what} is not encodable as UTF-8 (lone surrogate)") from None
    for ch in text:
        if ord(ch) < 0x20 and ch != "\n":
            raise MalformedNoteError(f"{what} contains control character {ch!r}: only newline is allowed")


# --------------------------------------------------------------------- keys


@dataclass(frozen=True)
class VerifierKey:
    """A parsed vkey: `<name>+<hex key ID>+<base64(type || public key)>`."""

    name: str
    key_id: int
    sig_type: int
    public_key: bytes

    @classmethod
    def parse(cls, vkey: str) -> VerifierKey:
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise KeyFormatError(f"verifier key must be '<name>+<hex id>+<base64 key>', got {vkey[:80]!r}")
        name, hex_id, b64 = parts
        if not is_valid_key_name(name):
            raise KeyFormatError(f"invalid key name {name!r}: non-empty, no spaces, no '+'")
        if not _HEX_ID.fullmatch(hex_id):
            raise KeyFormatError(f"key ID {hex_id!r} must be 8 lowercase hex digits")
        material = b64decode_strict(b64, "verifier key material", KeyFormatError)
        if len(material) < 2:
            raise KeyFormatError("verifier key material is empty: expected a type byte and a public key")
        if key_id(name, material) != int(hex_id, 16):
            raise KeyFormatError(
                f"key ID {hex_id} does not match key name {name!r} and its key: the vkey is corrupt or edited"
            )
        return cls(name, int(hex_id, 16), material[0], material[1:])

    def __str__(self) -> str:
        return f"{self.name}+{self.key_id:08x}+{b64encode(bytes([self.sig_type]) + self.public_key)}"


def parse_signer_key(skey: str) -> tuple[str, int, int, bytes]:
    """Parse `PRIVATE+KEY+<name>+<hex id>+<base64(type || private key)>` (key ID unchecked here)."""
    parts = skey.split("+", 4)
    if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
        raise KeyFormatError("signer key must be 'PRIVATE+KEY+<name>+<hex id>+<base64 key>'")
    name, hex_id, b64 = parts[2:]
    if not is_valid_key_name(name):
        raise KeyFormatError(f"invalid key name {name!r}: non-empty, no spaces, no '+'")
    if not _HEX_ID.fullmatch(hex_id):
        raise KeyFormatError(f"key ID {hex_id!r} must be 8 lowercase hex digits")
    material = b64decode_strict(b64, "signer key material", KeyFormatError)
    if len(material) < 2:
        raise KeyFormatError("signer key material is empty: expected a type byte and a private key")
    return name, int(hex_id, 16), material[0], material[1:]


class Verifier(Protocol):
    """Checks one key's signatures; `name` and `key_id` select it for a signature line."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> int: ...

    def verify(self, message: bytes, signature: bytes) -> bool: ...


class Signer(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> int: ...

    def sign(self, message: bytes) -> bytes: ...


class Ed25519KeyVerifier:
    """What every Ed25519-based verifier key shares (name, key ID, vkey string); the
    signature type and what exactly is signed are the subclass's (`sig_type`, `verify`)."""

    sig_type: int
    kind = "verifier key"  # for error messages

    def __init__(self, name: str, public_key: Ed25519PublicKey) -> None:
        if not is_valid_key_name(name):
            raise KeyFormatError(f"invalid {self.kind} name {name!r}: non-empty, no spaces, no '+'")
        self._name = name
        self._key = public_key
        self._raw = public_key.public_bytes_raw()
        self._id = key_id(name, bytes([self.sig_type]) + self._raw)

    @classmethod
    def from_vkey(cls, vkey: str) -> Self:
        parsed = VerifierKey.parse(vkey)
        if parsed.sig_type != cls.sig_type:
            raise KeyFormatError(
                f"{cls.kind} {parsed.name!r} has signature type 0x{parsed.sig_type:02x}, expected 0x{cls.sig_type:02x}"
            )
        if len(parsed.public_key) != 32:
            raise KeyFormatError(f"Ed25519 public key must be 32 bytes, got {len(parsed.public_key)}")
        return cls(parsed.name, Ed25519PublicKey.from_public_bytes(parsed.public_key))

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> int:
        return self._id

    @property
    def vkey(self) -> str:
        return str(VerifierKey(self._name, self._id, self.sig_type, self._raw))

    def verify(self, message: bytes, signature: bytes) -> bool:
        raise NotImplementedError


class Ed25519Verifier(Ed25519KeyVerifier):
    """Signature type 0x01: Ed25519 (RFC 8032) over the note text."""

    sig_type = SIG_ED25519

    def verify(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


class Ed25519KeySigner:
    """What every Ed25519-based signer key shares: the seed, the skey string, its verifier."""

    sig_type: int
    verifier_class: type[Ed25519KeyVerifier]

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self._verifier = self.verifier_class(name, private_key.public_key())
        self._key = private_key

    @classmethod
    def _from_seed(cls, skey: str) -> tuple[str, int, Ed25519PrivateKey]:
        """(name, key ID, private key) of `PRIVATE+KEY+<name>+<hex id>+<base64(type || seed)>`."""
        name, hex_id, sig_type, seed = parse_signer_key(skey)
        if sig_type != cls.sig_type:
            raise KeyFormatError(
                f"{cls.verifier_class.kind} signer key has signature type 0x{sig_type:02x}, expected 0x{cls.sig_type:02x}"
            )
        if len(seed) != 32:
            raise KeyFormatError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
        return name, hex_id, Ed25519PrivateKey.from_private_bytes(seed)

    def _check_id(self, hex_id: int) -> Self:
        if self.key_id != hex_id:
            raise KeyFormatError(f"signer key ID {hex_id:08x} does not match its name and key: the skey is corrupt")
        return self

    @property
    def name(self) -> str:
        return self._verifier.name

    @property
    def key_id(self) -> int:
        return self._verifier.key_id

    @property
    def skey(self) -> str:
        seed = self._key.private_bytes_raw()
        return f"PRIVATE+KEY+{self.name}+{self.key_id:08x}+{b64encode(bytes([self.sig_type]) + seed)}"


class Ed25519Signer(Ed25519KeySigner):
    """Signs note text with Ed25519 (type 0x01); the skey carries the 32-byte seed."""

    sig_type = SIG_ED25519
    verifier_class: type[Ed25519Verifier] = Ed25519Verifier

    @classmethod
    def generate(cls, name: str) -> Ed25519Signer:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_skey(cls, skey: str) -> Ed25519Signer:
        name, hex_id, key = cls._from_seed(skey)
        return cls(name, key)._check_id(hex_id)

    def verifier(self) -> Ed25519Verifier:
        assert isinstance(self._verifier, Ed25519Verifier)
        return self._verifier

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


# ------------------------------------------------------------------- notes


@dataclass(frozen=True)
class Signature:
    """One signature line: key name, key ID and the signature bytes after the ID."""

    name: str
    key_id: int
    signature: bytes

    def line(self) -> str:
        raw = self.key_id.to_bytes(4, "big") + self.signature
        return f"{SIG_PREFIX}{self.name} {b64encode(raw)}\n"


@dataclass(frozen=True)
class Note:
    """An opened note: `signatures` verified by known keys, `unverified` from unknown keys."""

    text: str
    signatures: tuple[Signature, ...] = ()
    unverified: tuple[Signature, ...] = field(default=())

    def signed_by(self, name: str, key_id: int) -> bool:
        return any(s.name == name and s.key_id == key_id for s in self.signatures)


def split_note(message: bytes | str) -> tuple[str, tuple[Signature, ...]]:
    """Parse a signed note WITHOUT verifying it: (text, signature lines in order).

    Rejects every syntax error the spec names: invalid UTF-8, control characters, no
    blank line before the signatures, no final newline, bad lines, bad names, bad
    base64, signatures shorter than a key ID plus one byte, more than MAX_SIGNATURES.
    """
    if isinstance(message, (bytes, bytearray, memoryview)):
        try:
            message = bytes(message).decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise MalformedNoteError("note is not valid UTF-8") from None
    _check_text(message, "note")
    split = message.rfind("\n\n")
    if split < 0:
        raise MalformedNoteError("note has no empty line before its signature lines")
    text, block = message[: split + 1], message[split + 2 :]
    if not block or not block.endswith("\n"):
        raise MalformedNoteError("note must end with one or more newline-terminated signature lines")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNoteError(f"note has {len(lines)} signatures; at most {MAX_SIGNATURES} are accepted")
    sigs: list[Signature] = []
    for line in lines:
        if not line.startswith(SIG_PREFIX):
            raise MalformedNoteError(f"signature line must start with an em dash and a space: {line[:60]!r}")
        name, sep, b64 = line[len(SIG_PREFIX) :].partition(" ")
        if not sep or not is_valid_key_name(name) or not b64:
            raise MalformedNoteError(f"signature line must be '— <key name> <base64>': {line[:60]!r}")
        raw = b64decode_strict(b64, f"signature of {name!r}", MalformedNoteError)
        if len(raw) < 5:
            raise MalformedNoteError(f"signature of {name!r} is shorter than a key ID plus a signature")
        sigs.append(Signature(name, int.from_bytes(raw[:4], "big"), raw[4:]))
    return text, tuple(sigs)


def open_note(message: bytes | str, verifiers: Iterable[Verifier]) -> Note:
    """Parse and verify a signed note against known verifiers; raise unless trusted.

    Raises MalformedNoteError (syntax), AmbiguousKeyError (two known keys share name
    and ID and one is used), InvalidSignatureError (a known key's signature fails:
    the whole note is rejected), UnverifiedNoteError (no known key signed; the parsed
    note is in its `note` attribute for diagnostics only).
    """
    text, sigs = split_note(message)
    known: dict[tuple[str, int], list[Verifier]] = {}
    for v in verifiers:
        known.setdefault((v.name, v.key_id), []).append(v)
    payload = text.encode("utf-8")
    verified: list[Signature] = []
    unverified: list[Signature] = []
    seen: set[tuple[str, int]] = set()
    for sig in sigs:
        key = (sig.name, sig.key_id)
        candidates = known.get(key)
        if not candidates:
            if sig not in unverified:
                unverified.append(sig)
            continue
        if len(candidates) > 1:
            raise AmbiguousKeyError(f"two configured verifiers are {sig.name}+{sig.key_id:08x}: remove one")
        if key in seen:
            continue  # a repeated signature by one key counts once
        seen.add(key)
        if not candidates[0].verify(payload, sig.signature):
            raise InvalidSignatureError(
                f"signature by {sig.name}+{sig.key_id:08x} does not verify: the note was altered or forged"
            )
        verified.append(sig)
    note = Note(text, tuple(verified), tuple(unverified))
    if not verified:
        names = ", ".join(f"{s.name}+{s.key_id:08x}" for s in unverified) or "none"
        raise UnverifiedNoteError(
            f"note has no verifiable signature from a known key (signed by: {names}); configure the signer's vkey",
            note,
        )
    return note


def sign_note(text: str, signers: Sequence[Signer], existing: Sequence[Signature] = ()) -> str:
    """Sign `text` with each signer; keep `existing` signatures of other keys first.

    An existing signature by the same (name, key ID) as a signer is replaced.
    """
    if not text.endswith("\n"):
        raise MalformedNoteError("note text must end with a newline")
    _check_text(text, "note text")
    payload = text.encode("utf-8")
    mine = {(s.name, s.key_id) for s in signers}
    kept = [s for s in existing if (s.name, s.key_id) not in mine]
    new: list[Signature] = []
    for signer in signers:
        if not is_valid_key_name(signer.name):
            raise MalformedNoteError(f"invalid signer name {signer.name!r}: non-empty, no spaces, no '+'")
        new.append(Signature(signer.name, signer.key_id, signer.sign(payload)))
    sigs = kept + new
    if not sigs:
        raise MalformedNoteError("a signed note needs at least one signature")
    if len(sigs) > MAX_SIGNATURES:
        raise MalformedNoteError(f"{len(sigs)} signatures exceed the limit of {MAX_SIGNATURES}")
    for s in kept:
        if not is_valid_key_name(s.name) or not s.signature:
            raise MalformedNoteError(f"existing signature {s.name!r} is malformed")
    return text + "\n" + "".join(s.line() for s in sigs)


def generate_key(name: str) -> tuple[str, str]:
    """A fresh Ed25519 note key pair as (skey, vkey) strings."""
    signer = Ed25519Signer.generate(name)
    return signer.skey, signer.verifier().vkey
