"""C2SP tlog-proof bundles: the spec example's proof part, round trip, offline verification."""

from __future__ import annotations

import base64

import pytest

from ledger.tlog.checkpoint import Checkpoint
from ledger.tlog.cosignature import CosignatureV1Signer
from ledger.tlog.errors import (
    InclusionProofError,
    InvalidSignatureError,
    MalformedProofBundleError,
    UnverifiedNoteError,
)
from ledger.tlog.merkle import MerkleLog, leaf_hash
from ledger.tlog.note import Ed25519Signer, sign_note
from ledger.tlog.proof import ProofBundle, verify_proof_bundle
from tests.ledger.tlog import vectors as v

SPEC_CHECKPOINT = (
    "example.com/fancylog\n109482\nsFodV/vSp5O8n9a8QpW6PRY97tfOSW5bsc2Xl/EQi08=\n\n"
    "\u2014 example.com/fancylog hI2DJw[...]1roloI=\n"
)


def test_spec_example_proof_part_parses_and_formats_back() -> None:
    text = v.C2SP_PROOF_HEAD + "\n" + SPEC_CHECKPOINT
    bundle = ProofBundle.parse(text)
    assert bundle.index == 73894
    assert bundle.extra is not None and bundle.extra.startswith(b"age-v1.2.1-darwin-arm64.tar.gz")
    assert len(bundle.inclusion_proof) == 5
    assert bundle.inclusion_proof[0] == base64.b64decode("gSKyXoYZUgZ6jduWYrkDOARinOMGJveXjgMkBTcdPlQ=")
    assert bundle.checkpoint == SPEC_CHECKPOINT
    assert bundle.format() == text


@pytest.mark.parametrize(
    "text",
    [
        "c2sp.org/tlog-proof@v2\nindex 0\n\ncp\n",
        "c2sp.org/tlog-proof@v1\nindex 01\n\ncp\n",
        "c2sp.org/tlog-proof@v1\nindex -1\n\ncp\n",
        "c2sp.org/tlog-proof@v1\n\ncp\n",  # no index line
        "c2sp.org/tlog-proof@v1\nextra !!\nindex 0\n\ncp\n",
        "c2sp.org/tlog-proof@v1\nindex 0\nAAAA\n\ncp\n",  # hash of 3 bytes
        "c2sp.org/tlog-proof@v1\nindex 0\ncp\n",  # no empty line
        "c2sp.org/tlog-proof@v1\nindex 0\n\n",  # no checkpoint
        "c2sp.org/tlog-proof@v1\nindex 0\nextra AAAA\n\ncp\n",  # extra after index
    ],
)
def test_malformed_bundles(text: str) -> None:
    """Each case breaks one rule of the tlog-proof format."""
    with pytest.raises(MalformedProofBundleError):
        ProofBundle.parse(text)


def _log_with_witnesses() -> tuple[MerkleLog, Ed25519Signer, list[CosignatureV1Signer], str]:
    log = MerkleLog()
    log.extend(f"execution-record-{i}".encode() for i in range(1000))
    log_key = Ed25519Signer.generate("edgeledger.local/records")
    witnesses = [CosignatureV1Signer.generate(f"agent-{i}") for i in range(3)]
    cp = Checkpoint(log_key.name, log.size, log.root())
    return log, log_key, witnesses, sign_note(cp.body(), [log_key, *witnesses[:2]])


def test_bundle_verifies_offline_with_keys_only() -> None:
    log, log_key, witnesses, signed = _log_with_witnesses()
    index = 737
    bundle = ProofBundle(index, tuple(log.inclusion_proof(index)), signed, extra=b"record id 737")
    text = bundle.format()
    verifiers = [w.verifier() for w in witnesses]
    leaf = leaf_hash(b"execution-record-737")
    result = verify_proof_bundle(text.encode(), leaf, log_key.verifier(), verifiers, quorum=2)
    assert result.checkpoint.size == 1000
    assert result.bundle == bundle
    assert sorted(result.cosigned.cosigned_at) == ["agent-0", "agent-1"]


def test_bundle_rejections() -> None:
    log, log_key, witnesses, signed = _log_with_witnesses()
    verifiers = [w.verifier() for w in witnesses]
    text = ProofBundle(5, tuple(log.inclusion_proof(5)), signed).format()
    with pytest.raises(InclusionProofError):
        verify_proof_bundle(text, leaf_hash(b"execution-record-6"), log_key.verifier(), verifiers, quorum=2)
    with pytest.raises(UnverifiedNoteError):
        verify_proof_bundle(text, leaf_hash(b"execution-record-5"), log_key.verifier(), verifiers, quorum=3)
    wrong_index = ProofBundle(4, tuple(log.inclusion_proof(5)), signed).format()
    with pytest.raises(InclusionProofError):
        verify_proof_bundle(wrong_index, leaf_hash(b"execution-record-5"), log_key.verifier(), verifiers, quorum=2)
    edited = text.replace("\n1000\n", "\n1001\n")
    with pytest.raises(InvalidSignatureError):
        verify_proof_bundle(edited, leaf_hash(b"execution-record-5"), log_key.verifier(), verifiers, quorum=2)
