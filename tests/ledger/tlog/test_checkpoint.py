"""C2SP tlog-checkpoint: published checkpoints, strict parse/format."""

from __future__ import annotations

import base64

import pytest

from ledger.tlog.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from ledger.tlog.errors import InvalidSignatureError, MalformedCheckpointError, UnverifiedNoteError
from ledger.tlog.merkle import MerkleLog, leaf_hash
from ledger.tlog.note import Ed25519Signer, Ed25519Verifier, split_note
from tests.ledger.tlog import vectors as v

SPEC_BODY = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"


def test_go_tlog_tree_note_formats_exactly() -> None:
    """sumdb/tlog TestFormatTree: the root line is base64 of RecordHash('hello world')."""
    cp = Checkpoint("go.sum database tree", 123456789012, leaf_hash(b"hello world"))
    assert cp.body() == v.GO_TLOG_TREE_TEXT
    assert Checkpoint.parse(v.GO_TLOG_TREE_TEXT) == cp


def test_go_sumdb_signed_tree_is_reproduced_and_verifies() -> None:
    signer = Ed25519Signer.from_skey(v.GO_SUMDB_SKEY)
    assert signer.verifier().vkey == v.GO_SUMDB_VKEY
    text, _ = split_note(v.GO_SUMDB_SIGNED_TREE)
    cp = Checkpoint.parse(text)
    assert (cp.origin, cp.size) == ("go.sum database tree", 6)
    assert sign_checkpoint(cp, signer) == v.GO_SUMDB_SIGNED_TREE
    opened, note = open_checkpoint(
        v.GO_SUMDB_SIGNED_TREE, Ed25519Verifier.from_vkey(v.GO_SUMDB_VKEY), origin="go.sum database tree"
    )
    assert opened == cp and note.text == text


def test_spec_example_parses() -> None:
    cp = Checkpoint.parse(SPEC_BODY)
    assert cp.origin == "example.com/behind-the-sofa"
    assert cp.size == 20852163
    assert cp.root_hash == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert cp.extensions == ()
    assert cp.body() == SPEC_BODY


def test_extension_lines_round_trip_and_empty_tree() -> None:
    log = MerkleLog()
    cp = Checkpoint("edgeledger.local/records", 0, log.root(), ("anchor 0xabc", "x"))
    assert Checkpoint.parse(cp.body()) == cp
    assert cp.body().split("\n")[1] == "0"


@pytest.mark.parametrize(
    "text",
    [
        "example.com/log\n1\n" + "A" * 43 + "=",  # no final newline
        "example.com/log\n1\n",  # two lines
        "\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",  # empty origin
        "example.com/log\n01\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",  # leading zero
        "example.com/log\n+1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",
        "example.com/log\n1_0\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",
        "example.com/log\n\u0661\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",  # Arabic-Indic digit
        "example.com/log\n 1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",
        "example.com/log\n18446744073709551616\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",  # 2**64
        "example.com/log\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I\n",  # unpadded
        "example.com/log\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2J=\n",  # non-canonical bits
        "example.com/log\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jx\n",  # 30 bytes
        "example.com/log\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n",  # empty extension
        "example.com/log\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\next\x01\n",
    ],
)
def test_malformed_checkpoints_are_rejected(text: str) -> None:
    with pytest.raises(MalformedCheckpointError):
        Checkpoint.parse(text)


def test_constructor_validates_fields() -> None:
    with pytest.raises(MalformedCheckpointError):
        Checkpoint("", 1, b"\x00" * 32)
    with pytest.raises(MalformedCheckpointError):
        Checkpoint("o", -1, b"\x00" * 32)
    with pytest.raises(MalformedCheckpointError):
        Checkpoint("o", 1, b"\x00" * 31)
    with pytest.raises(MalformedCheckpointError):
        Checkpoint("o\nx", 1, b"\x00" * 32)
    with pytest.raises(MalformedCheckpointError):
        Checkpoint("o", 1, b"\x00" * 32, ("",))


def test_open_checkpoint_requires_the_log_key_and_origin() -> None:
    log_key = Ed25519Signer.generate("edgeledger.local/records")
    other = Ed25519Signer.generate("edgeledger.local/records")
    log = MerkleLog()
    log.extend([b"r1", b"r2", b"r3"])
    cp = Checkpoint(log_key.name, log.size, log.root())
    signed = sign_checkpoint(cp, log_key)
    assert open_checkpoint(signed, log_key.verifier())[0] == cp
    with pytest.raises(UnverifiedNoteError):
        open_checkpoint(sign_checkpoint(cp, other), log_key.verifier())
    with pytest.raises(MalformedCheckpointError, match="wrong log"):
        open_checkpoint(signed, log_key.verifier(), origin="edgeledger.local/other")
    tampered = signed.replace(f"\n{log.size}\n", f"\n{log.size + 1}\n")
    with pytest.raises(InvalidSignatureError):
        open_checkpoint(tampered, log_key.verifier())
