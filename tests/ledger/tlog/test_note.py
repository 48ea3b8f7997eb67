"""C2SP signed notes: Go sumdb/note and C2SP published vectors, strict rejection."""

from __future__ import annotations

import pytest

from ledger.tlog.errors import (
    AmbiguousKeyError,
    InvalidSignatureError,
    KeyFormatError,
    MalformedNoteError,
    UnverifiedNoteError,
)
from ledger.tlog.note import (
    MAX_SIGNATURES,
    Ed25519Signer,
    Ed25519Verifier,
    Signature,
    VerifierKey,
    generate_key,
    key_id,
    open_note,
    sign_note,
    split_note,
)
from tests.ledger.tlog import vectors as v

PETER = Ed25519Verifier.from_vkey(v.GO_NOTE_PETER_VKEY)
ENOCH = Ed25519Verifier.from_vkey(v.GO_NOTE_ENOCH_VKEY)
SIGNED = v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG + v.GO_NOTE_ENOCH_SIG


def test_keys_round_trip_and_key_id_derivation() -> None:
    signer = Ed25519Signer.from_skey(v.GO_NOTE_PETER_SKEY)
    assert signer.skey == v.GO_NOTE_PETER_SKEY
    assert signer.verifier().vkey == v.GO_NOTE_PETER_VKEY
    assert PETER.vkey == v.GO_NOTE_PETER_VKEY
    parsed = VerifierKey.parse(v.GO_NOTE_PETER_VKEY)
    assert parsed.key_id == 0xC74F20A3 == key_id("PeterNeumann", b"\x01" + parsed.public_key)
    assert Ed25519Verifier.from_vkey(v.C2SP_NOTE_VKEY).key_id == 0x530D903A


def test_sign_reproduces_go_signature_exactly() -> None:
    signer = Ed25519Signer.from_skey(v.GO_NOTE_PETER_SKEY)
    assert sign_note(v.GO_NOTE_TEXT, [signer]) == v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG


def test_sign_replaces_existing_signature_of_same_key() -> None:
    signer = Ed25519Signer.from_skey(v.GO_NOTE_PETER_SKEY)
    stale = Signature("PeterNeumann", 0xC74F20A3, b"BADSIGN")
    enoch = split_note(v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_ENOCH_SIG)[1][0]
    out = sign_note(v.GO_NOTE_TEXT, [signer], existing=[stale, enoch])
    assert out == v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_ENOCH_SIG + v.GO_NOTE_PETER_SIG


def test_spec_example_note_verifies() -> None:
    note = open_note(v.C2SP_NOTE, [Ed25519Verifier.from_vkey(v.C2SP_NOTE_VKEY)])
    assert note.text == "This is an example message.\n"
    assert [s.name for s in note.signatures] == ["example.com/foo"]


def test_open_one_known_one_unknown() -> None:
    note = open_note(SIGNED, [PETER])
    assert note.text == v.GO_NOTE_TEXT
    assert [(s.name, s.key_id) for s in note.signatures] == [("PeterNeumann", 0xC74F20A3)]
    assert [(s.name, s.key_id) for s in note.unverified] == [("EnochRoot", 0xAF0CFE78)]


def test_open_both_known() -> None:
    note = open_note(SIGNED.encode("utf-8"), [PETER, ENOCH])
    assert [s.name for s in note.signatures] == ["PeterNeumann", "EnochRoot"]
    assert note.unverified == ()


def test_open_without_known_keys_is_rejected_with_the_parsed_note() -> None:
    with pytest.raises(UnverifiedNoteError, match="no verifiable signature") as info:
        open_note(SIGNED, [])
    assert [s.name for s in info.value.note.unverified] == ["PeterNeumann", "EnochRoot"]


def test_same_name_or_same_id_alone_is_an_unknown_key() -> None:
    other = Ed25519Signer.generate("PeterNeumann").verifier()  # same name, different ID
    with pytest.raises(UnverifiedNoteError):
        open_note(v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG, [other])


def test_duplicated_verifier_is_ambiguous_only_when_used() -> None:
    with pytest.raises(AmbiguousKeyError, match="EnochRoot\\+af0cfe78"):
        open_note(v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_ENOCH_SIG, [ENOCH, PETER, ENOCH])
    assert open_note(v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG, [ENOCH, PETER, ENOCH]).signatures


def test_bad_signature_from_known_key_rejects_whole_note() -> None:
    sig = v.GO_NOTE_PETER_SIG
    corrupted = v.GO_NOTE_TEXT + "\n" + sig[:60] + "ABCD" + sig[60:]
    with pytest.raises(InvalidSignatureError, match="PeterNeumann\\+c74f20a3"):
        open_note(corrupted, [PETER])
    with pytest.raises(InvalidSignatureError):
        open_note("X" + SIGNED, [PETER, ENOCH])  # edited text


def test_repeated_signatures_count_once() -> None:
    enoch = v.GO_NOTE_ENOCH_SIG
    msg = v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG * 2 + enoch * 2 + enoch[:60] + "ABCD" + enoch[60:]
    note = open_note(msg, [PETER])
    assert len(note.signatures) == 1
    assert len(note.unverified) == 2  # the duplicate unknown line is dropped, the altered one kept


def test_too_many_signatures_is_malformed() -> None:
    msg = v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG * (MAX_SIGNATURES + 1)
    with pytest.raises(MalformedNoteError):
        open_note(msg, [PETER])
    assert open_note(v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG * 16, [PETER]).signatures  # spec: >= 16 accepted


@pytest.mark.parametrize(
    "message",
    [
        v.GO_NOTE_TEXT,  # no signatures
        v.GO_NOTE_TEXT + "\n",  # empty signature block
        v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG[:-1],  # last line not newline-terminated
        "\x01" + v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG,  # control character
        "\t" + v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG,  # tab is a control character too
        b"\xff" + (v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG).encode(),  # invalid UTF-8
        v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG.replace("PeterNeumann", "Bad Name"),
        v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG.replace("PeterNeumann", "Peter+Neumann"),
        v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG + "Unexpected line.\n",
        v.GO_NOTE_TEXT + "\n" + "- PeterNeumann x08go/ZJku\n",  # hyphen, not em dash
        v.GO_NOTE_TEXT + "\n" + "\u2014 PeterNeumann AAAA\n",  # shorter than key ID + 1 byte
        v.GO_NOTE_TEXT + "\n" + "\u2014 PeterNeumann not*base64\n",
        v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG.replace("AM=\n", "AM\n"),  # missing padding
        v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG + "\n",  # trailing blank line
        v.GO_NOTE_TEXT + "\r\n" + v.GO_NOTE_PETER_SIG,  # CR
        "\ud800" + v.GO_NOTE_TEXT + "\n" + v.GO_NOTE_PETER_SIG,  # str that is not UTF-8 encodable
    ],
)
def test_malformed_notes_are_rejected(message: str | bytes) -> None:
    with pytest.raises(MalformedNoteError):
        open_note(message, [PETER])


def test_text_may_contain_empty_lines_the_last_one_separates() -> None:
    """signed-note: 'The note text MAY contain empty lines'."""
    signer = Ed25519Signer.generate("example.com/poem")
    text = "Ognuno sta solo sul cuor della terra\n\ned è subito sera.\n"
    note = open_note(sign_note(text, [signer]), [signer.verifier()])
    assert note.text == text


@pytest.mark.parametrize("text", ["no final newline", "ok\x00\n", "tab\there\n", "lone \ud800 surrogate\n"])
def test_sign_rejects_invalid_text(text: str) -> None:
    with pytest.raises(MalformedNoteError):
        sign_note(text, [Ed25519Signer.generate("k")])


def test_sign_needs_a_signature() -> None:
    with pytest.raises(MalformedNoteError, match="at least one signature"):
        sign_note("text\n", [])


def test_vkey_manglings_are_rejected() -> None:
    """Go TestNewVerifier: every proper substring and every single-byte change is refused."""
    key = v.GO_NOTE_PETER_VKEY
    for i in range(len(key) + 1):
        for j in range(i + 1, len(key) + 1):
            if (i, j) != (0, len(key)):
                with pytest.raises(KeyFormatError):
                    Ed25519Verifier.from_vkey(key[i:j])
    for i in range(len(key)):
        mangled = key[:i] + chr(ord(key[i]) + 1) + key[i + 1 :]
        with pytest.raises(KeyFormatError):
            Ed25519Verifier.from_vkey(mangled)
    for bad in v.GO_NOTE_BAD_VKEYS:
        with pytest.raises(KeyFormatError):
            Ed25519Verifier.from_vkey(bad)


def test_skey_manglings_are_rejected() -> None:
    key = v.GO_NOTE_PETER_SKEY
    for i in range(len(key)):
        mangled = key[:i] + chr(ord(key[i]) + 1) + key[i + 1 :]
        with pytest.raises(KeyFormatError):
            Ed25519Signer.from_skey(mangled)
    for cut in range(1, len(key)):
        with pytest.raises(KeyFormatError):
            Ed25519Signer.from_skey(key[:cut])


@pytest.mark.parametrize("name", ["", "has space", "a+b", "tab\tname", "nbsp\u00a0name"])
def test_invalid_key_names(name: str) -> None:
    with pytest.raises(KeyFormatError):
        Ed25519Signer.generate(name)


def test_generate_key_round_trip() -> None:
    skey, vkey = generate_key("edgeledger.local/log")
    signer = Ed25519Signer.from_skey(skey)
    verifier = Ed25519Verifier.from_vkey(vkey)
    assert (signer.name, signer.key_id) == (verifier.name, verifier.key_id)
    note = open_note(sign_note("hello\n", [signer]), [verifier])
    assert note.signed_by(verifier.name, verifier.key_id)
