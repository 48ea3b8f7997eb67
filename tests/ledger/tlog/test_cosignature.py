"""C2SP tlog-cosignature v1 (Ed25519): key IDs, the exact signed message, witness quorum."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.tlog.checkpoint import Checkpoint, sign_checkpoint
from ledger.tlog.cosignature import (
    CosignatureV1Signer,
    CosignatureV1Verifier,
    cosignature_timestamp,
    cosigned_message,
    open_cosigned_checkpoint,
)
from ledger.tlog.errors import (
    CosignatureError,
    InvalidSignatureError,
    KeyFormatError,
    MalformedCheckpointError,
    UnverifiedNoteError,
)
from ledger.tlog.merkle import MerkleLog
from ledger.tlog.note import Ed25519Signer, Ed25519Verifier, Signature, open_note, sign_note, split_note
from tests.ledger.tlog import vectors as v

BODY = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
SEED = bytes(range(32))


def test_published_witness_vkey_key_id_uses_type_0x04() -> None:
    verifier = CosignatureV1Verifier.from_vkey(v.FORMATS_COSIG_VKEY)
    raw = base64.b64decode(v.FORMATS_COSIG_VKEY.split("+", 2)[2])
    assert raw[0] == 0x04
    expected = hashlib.sha256(b"remora.n621.de\n\x04" + raw[1:]).digest()[:4]
    assert verifier.key_id == int.from_bytes(expected, "big") == 0xDA77ADE7
    assert verifier.vkey == v.FORMATS_COSIG_VKEY


def test_an_ed25519_note_vkey_is_not_a_witness_vkey() -> None:
    with pytest.raises(KeyFormatError, match="type 0x01"):
        CosignatureV1Verifier.from_vkey(v.FORMATS_ED25519_VKEY)
    with pytest.raises(KeyFormatError, match="type 0x04"):
        Ed25519Verifier.from_vkey(v.FORMATS_COSIG_VKEY)


def test_published_cosignature_timestamps() -> None:
    raw = base64.b64decode(v.FORMATS_COSIG_B64)
    sig = Signature("w", int.from_bytes(raw[:4], "big"), raw[4:])
    assert cosignature_timestamp(sig) == v.FORMATS_COSIG_TIME
    raw = base64.b64decode(v.FORMATS_NOT_COSIG_B64)
    with pytest.raises(CosignatureError):
        cosignature_timestamp(Signature("w", 0, raw[4:]))
    # The C2SP spec example: key ID 8d66cf3f and the timestamp of its "time 1679315147" line.
    witness = [s for s in split_note(v.C2SP_COSIGNED_CHECKPOINT)[1] if s.name == "witness.example.com/w1"][0]
    assert witness.key_id == 0x8D66CF3F
    assert cosignature_timestamp(witness) == v.C2SP_COSIGNATURE_TIME


def test_signed_message_is_exactly_the_spec_layout() -> None:
    assert cosigned_message(BODY, 1679315147) == (
        b"cosignature/v1\ntime 1679315147\n"
        b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    )
    private = Ed25519PrivateKey.from_private_bytes(SEED)
    signer = CosignatureV1Signer("witness.example/w1", private)
    sig = signer.sign_at(BODY.encode(), 1679315147)
    assert len(sig) == 72
    assert sig[:8] == (1679315147).to_bytes(8, "big")
    # An independent check with the raw primitive over the hand-built message.
    private.public_key().verify(sig[8:], b"cosignature/v1\ntime 1679315147\n" + BODY.encode())
    pub = private.public_key().public_bytes_raw()
    assert signer.key_id == int.from_bytes(hashlib.sha256(b"witness.example/w1\n\x04" + pub).digest()[:4], "big")


def test_signer_key_round_trip_and_clock() -> None:
    signer = CosignatureV1Signer(
        "witness.example/w1", Ed25519PrivateKey.from_private_bytes(SEED), clock=lambda: 1700000000.9
    )
    again = CosignatureV1Signer.from_skey(signer.skey)
    assert (again.name, again.key_id) == (signer.name, signer.key_id)
    assert signer.skey.startswith("PRIVATE+KEY+witness.example/w1+")
    assert base64.b64decode(signer.skey.split("+", 4)[4])[0] == 0x04
    sig = signer.sign(BODY.encode())
    assert int.from_bytes(sig[:8], "big") == 1700000000
    assert CosignatureV1Verifier.from_vkey(signer.verifier().vkey).verify(BODY.encode(), sig)
    with pytest.raises(KeyFormatError):
        CosignatureV1Signer.from_skey(Ed25519Signer.generate("k").skey)  # a 0x01 key


def test_timestamp_bounds() -> None:
    with pytest.raises(CosignatureError):
        cosigned_message(BODY, 2**63)
    with pytest.raises(CosignatureError):
        cosigned_message(BODY, -1)
    signer = CosignatureV1Signer.generate("w")
    sig = signer.sign_at(BODY.encode(), 2**63 - 1)
    assert signer.verifier().verify(BODY.encode(), sig)
    over = (2**63).to_bytes(8, "big") + sig[8:]
    assert not signer.verifier().verify(BODY.encode(), over)


def test_only_checkpoints_are_cosigned() -> None:
    signer = CosignatureV1Signer.generate("w")
    with pytest.raises(MalformedCheckpointError):
        signer.sign_at(b"just a note\n", 1)
    sig = signer.sign_at(BODY.encode(), 1)
    assert not signer.verifier().verify(b"just a note\n", sig)


def test_cosignature_covers_timestamp_and_extension_lines() -> None:
    signer = CosignatureV1Signer.generate("w")
    body = BODY + "Extendo\n"
    sig = signer.sign_at(body.encode(), 42)
    verifier = signer.verifier()
    assert verifier.verify(body.encode(), sig)
    assert not verifier.verify((BODY + "Extend@\n").encode(), sig)
    assert not verifier.verify(body.encode(), (43).to_bytes(8, "big") + sig[8:])
    assert not verifier.verify(body.encode(), sig[:-1])


def test_key_types_cannot_stand_in_for_each_other() -> None:
    """A cosignature is not a plain Ed25519 note signature over the same key, and vice versa."""
    private = Ed25519PrivateKey.generate()
    witness = CosignatureV1Signer("w", private)
    plain = Ed25519Signer("w", private)
    assert witness.key_id != plain.key_id
    cosigned = sign_note(BODY, [witness])
    with pytest.raises(UnverifiedNoteError):
        open_note(cosigned, [plain.verifier()])  # different key ID: unknown key
    # A plain signature presented under the witness key ID (with a timestamp prefix) fails.
    raw_sig = plain.sign(BODY.encode())
    forged = BODY + "\n" + Signature("w", witness.key_id, raw_sig + b"\x00" * 8).line()
    with pytest.raises(InvalidSignatureError):
        open_note(forged, [witness.verifier()])


def _setup(witness_count: int = 3) -> tuple[Ed25519Signer, list[CosignatureV1Signer], Checkpoint, str]:
    log_key = Ed25519Signer.generate("edgeledger.local/records")
    witnesses = [
        CosignatureV1Signer.generate(f"agent-{i}.edgeledger.local", clock=lambda: 1765000000)
        for i in range(witness_count)
    ]
    log = MerkleLog()
    log.extend([b"record-1", b"record-2"])
    cp = Checkpoint(log_key.name, log.size, log.root())
    return log_key, witnesses, cp, sign_checkpoint(cp, log_key)


def test_witness_quorum() -> None:
    log_key, witnesses, cp, signed = _setup()
    text, sigs = split_note(signed)
    lines = [w.cosign(cp) for w in witnesses[:2]]
    cosigned = text + "\n" + "".join(s.line() for s in (*sigs, *lines))  # witnesses append lines
    verifiers = [w.verifier() for w in witnesses]
    result = open_cosigned_checkpoint(cosigned, log_key.verifier(), verifiers, quorum=2)
    assert result.checkpoint == cp
    assert result.cosigned_at == {witnesses[0].name: 1765000000, witnesses[1].name: 1765000000}
    with pytest.raises(UnverifiedNoteError, match="2 valid witness cosignature\\(s\\), 3 required"):
        open_cosigned_checkpoint(cosigned, log_key.verifier(), verifiers, quorum=3)
    with pytest.raises(ValueError):
        open_cosigned_checkpoint(cosigned, log_key.verifier(), verifiers, quorum=4)
    with pytest.raises(ValueError, match="share a name"):
        open_cosigned_checkpoint(cosigned, log_key.verifier(), [verifiers[0], verifiers[0]], quorum=1)


def test_witness_signatures_via_sign_note_and_bad_cosignature_rejects() -> None:
    log_key, witnesses, cp, _ = _setup(2)
    cosigned = sign_note(cp.body(), [log_key, *witnesses])
    verifiers = [w.verifier() for w in witnesses]
    assert len(open_cosigned_checkpoint(cosigned, log_key.verifier(), verifiers, quorum=2).cosigned_at) == 2
    # A cosignature for another tree head, pasted onto this checkpoint, fails closed.
    other = Checkpoint(cp.origin, cp.size + 1, cp.root_hash)
    text, sigs = split_note(cosigned)
    pasted = text + "\n" + sigs[0].line() + witnesses[0].cosign(other).line()
    with pytest.raises(InvalidSignatureError):
        open_cosigned_checkpoint(pasted, log_key.verifier(), verifiers, quorum=1)


def test_cosignatures_alone_are_not_a_checkpoint() -> None:
    log_key, witnesses, cp, _ = _setup(1)
    only_witness = sign_note(cp.body(), witnesses)
    with pytest.raises(UnverifiedNoteError):
        open_cosigned_checkpoint(only_witness, log_key.verifier(), [witnesses[0].verifier()], quorum=1)
