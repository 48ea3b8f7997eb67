"""RFC 6962 / RFC 9162 Merkle tree: published vectors, an independent implementation
(pymerkle) and properties over random trees."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.tlog.errors import ConsistencyProofError, InclusionProofError, ProofError, TlogError
from ledger.tlog.merkle import (
    EMPTY_ROOT,
    MemoryNodeStore,
    MerkleLog,
    SQLiteNodeStore,
    inclusion_proof_length,
    leaf_hash,
    node_hash,
    root_from_inclusion_proof,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from tests.ledger.tlog import vectors as v

PROBES = json.loads((Path(__file__).parent / "vectors" / "transparency_dev_merkle_probes.json").read_text())


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _hexes(values: list[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in values]


@pytest.fixture
def reference_log() -> MerkleLog:
    log = MerkleLog()
    log.extend(v.RFC6962_LEAF_INPUTS)
    return log


# ------------------------------------------------------------ published vectors


def test_hashing_primitives_match_rfc6962_reference_nodes() -> None:
    leaves = [leaf_hash(d) for d in v.RFC6962_LEAF_INPUTS]
    assert [h.hex() for h in leaves] == v.RFC6962_NODE_HASHES[0]
    assert node_hash(leaves[0], leaves[1]).hex() == v.RFC6962_NODE_HASHES[1][0]
    assert EMPTY_ROOT.hex() == v.RFC6962_ROOTS[0] == hashlib.sha256(b"").hexdigest()


def test_roots_of_every_prefix_match_reference(reference_log: MerkleLog) -> None:
    for size, want in enumerate(v.RFC6962_ROOTS):
        assert reference_log.root(size).hex() == want
        assert root_of(v.RFC6962_LEAF_INPUTS[:size]).hex() == want


def test_stored_nodes_are_the_reference_complete_subtrees(reference_log: MerkleLog) -> None:
    for level, row in enumerate(v.RFC6962_NODE_HASHES):
        keys = [(level, i) for i in range(len(row))]
        assert [h.hex() for h in reference_log.store.get_nodes(keys)] == row


@pytest.mark.parametrize(("index", "size", "proof"), v.RFC6962_INCLUSION_PROOFS)
def test_inclusion_proofs_match_reference(reference_log: MerkleLog, index: int, size: int, proof: list[str]) -> None:
    got = reference_log.inclusion_proof(index, size)
    assert [h.hex() for h in got] == proof
    verify_inclusion(reference_log.leaf_hash_at(index), index, size, got, bytes.fromhex(v.RFC6962_ROOTS[size]))


@pytest.mark.parametrize(("size1", "size2", "proof"), v.RFC6962_CONSISTENCY_PROOFS)
def test_consistency_proofs_match_reference(reference_log: MerkleLog, size1: int, size2: int, proof: list[str]) -> None:
    got = reference_log.consistency_proof(size1, size2)
    assert [h.hex() for h in got] == proof
    verify_consistency(
        size1, size2, bytes.fromhex(v.RFC6962_ROOTS[size1]), bytes.fromhex(v.RFC6962_ROOTS[size2]), got
    )


@pytest.mark.parametrize("probe", PROBES["inclusion"], ids=lambda p: p["file"])
def test_inclusion_probes(probe: dict) -> None:
    args = (
        _b64(probe["leafHash"]),
        probe["leafIdx"],
        probe["treeSize"],
        [_b64(h) for h in probe["proof"] or []],
        _b64(probe["root"]),
    )
    if probe["wantErr"]:
        with pytest.raises(InclusionProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("probe", PROBES["consistency"], ids=lambda p: p["file"])
def test_consistency_probes(probe: dict) -> None:
    args = (
        probe["size1"],
        probe["size2"],
        _b64(probe["root1"]),
        _b64(probe["root2"]),
        [_b64(h) for h in probe["proof"] or []],
    )
    if probe["wantErr"]:
        with pytest.raises(ConsistencyProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def _subtree_valid(start: int, end: int) -> bool:
    """[start, end) is a subtree: start is a multiple of the smallest power of 2 >= end - start."""
    if start == 0 or start == end:
        return True
    return start % (1 << (end - start - 1).bit_length()) == 0


def test_subtree_hash_digest_vector() -> None:
    entries = [bytes([i]) for i in range(v.SUBTREE_VECTOR_LEAVES)]
    digest = hashlib.sha256()
    for end in range(v.SUBTREE_VECTOR_LEAVES + 1):
        for start in range(end + 1):
            if _subtree_valid(start, end):
                digest.update(f"[{start}, {end}) {root_of(entries[start:end]).hex()}\n".encode())
    assert digest.hexdigest() == v.SUBTREE_HASH_DIGEST


def test_subtree_inclusion_digest_vector() -> None:
    """Inclusion in [start, end) is PATH(index - start, D[start:end]): every proof our log makes."""
    entries = [bytes([i]) for i in range(v.SUBTREE_VECTOR_LEAVES)]
    digest = hashlib.sha256()
    for end in range(v.SUBTREE_VECTOR_LEAVES + 1):
        for start in range(end + 1):
            if not _subtree_valid(start, end) or start == end:
                continue
            log = MerkleLog()
            log.extend(entries[start:end])
            for index in range(start, end):
                proof = "".join(" " + h.hex() for h in log.inclusion_proof(index - start))
                digest.update(f"{index} [{start}, {end}){proof}\n".encode())
    assert digest.hexdigest() == v.SUBTREE_INCLUSION_DIGEST


# ------------------------------------------------------------ independent implementation


def test_cross_check_with_pymerkle() -> None:
    """pymerkle (RFC 6962 hashing with its default security prefixes) agrees on roots and
    inclusion paths, and its own consistency proofs verify against our roots."""
    import pymerkle  # test extra: an independent RFC 6962 implementation

    entries = [hashlib.sha256(str(i).encode()).digest()[: i % 9] for i in range(100)]
    theirs = pymerkle.InmemoryTree(algorithm="sha256")
    ours = MerkleLog()
    for entry in entries:
        theirs.append_entry(entry)
        ours.append(entry)
    for size in range(0, 101):
        assert theirs.get_root(size) == ours.root(size)
    for size in (1, 2, 3, 7, 8, 13, 64, 100):
        for index in range(size):
            path = [bytes.fromhex(h) for h in theirs.prove_inclusion(index + 1, size).serialize()["path"]]
            # pymerkle's path starts with the leaf itself, then the RFC 9162 PATH.
            assert path[0] == ours.leaf_hash_at(index)
            assert path[1:] == ours.inclusion_proof(index, size)
        for size1 in range(1, size + 1):
            theirs_proof = theirs.prove_consistency(size1, size)
            pymerkle.verify_consistency(ours.root(size1), ours.root(size), theirs_proof)
            ours_proof = ours.consistency_proof(size1, size)
            verify_consistency(size1, size, ours.root(size1), ours.root(size), ours_proof)
            # (pymerkle's consistency path uses its own node layout, so only roots compare.)


# ------------------------------------------------------------ storage


def test_sqlite_store_matches_memory_and_survives_reopen(tmp_path: Path) -> None:
    db = tmp_path / "tlog.sqlite"
    entries = [i.to_bytes(4, "big") for i in range(300)]
    memory = MerkleLog(MemoryNodeStore())
    memory.extend(entries)
    conn = sqlite3.connect(db)
    with conn:
        first = MerkleLog(SQLiteNodeStore(conn))
        first.extend(entries[:123])
        for entry in entries[123:200]:
            first.append(entry)
    conn.close()
    conn = sqlite3.connect(db)
    with conn:
        reopened = MerkleLog(SQLiteNodeStore(conn))
        assert reopened.size == 200
        reopened.extend(entries[200:])
    assert reopened.root() == memory.root()
    for size in (1, 5, 123, 200, 256, 300):
        assert reopened.root(size) == memory.root(size)
        assert reopened.inclusion_proof(size - 1, size) == memory.inclusion_proof(size - 1, size)
        assert reopened.consistency_proof(max(1, size // 3), size) == memory.consistency_proof(max(1, size // 3), size)
    conn.close()


def test_sqlite_store_rolls_back_with_callers_transaction(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "tlog.sqlite")
    with conn:
        MerkleLog(SQLiteNodeStore(conn)).extend([b"a", b"b", b"c"])
    with pytest.raises(RuntimeError), conn:
        MerkleLog(SQLiteNodeStore(conn)).extend([b"d", b"e"])
        raise RuntimeError("journal write failed")
    log = MerkleLog(SQLiteNodeStore(conn))
    assert log.size == 3
    assert log.root() == root_of([b"a", b"b", b"c"])
    conn.close()


def test_sqlite_store_rejects_unsafe_table_name() -> None:
    with pytest.raises(ValueError, match="invalid table name"):
        SQLiteNodeStore(sqlite3.connect(":memory:"), table="x; DROP TABLE y")


def test_memory_store_refuses_out_of_order_nodes() -> None:
    store = MemoryNodeStore()
    store.append_nodes([(0, 0, b"\x00" * 32)], 1)
    with pytest.raises(ProofError, match="append-only"):
        store.append_nodes([(0, 2, b"\x00" * 32)], 2)


def test_append_writes_each_node_once_in_one_store_call() -> None:
    calls: list[list[tuple[int, int, bytes]]] = []

    class Recording(MemoryNodeStore):
        def append_nodes(self, nodes, new_size):  # type: ignore[no-untyped-def]
            calls.append(list(nodes))
            super().append_nodes(nodes, new_size)

    log = MerkleLog(Recording())
    log.extend(bytes([i]) for i in range(8))
    assert len(calls) == 1
    assert sorted((lvl, idx) for lvl, idx, _ in calls[0]) == sorted(
        [(0, i) for i in range(8)] + [(1, i) for i in range(4)] + [(2, 0), (2, 1), (3, 0)]
    )
    log.append(b"x")
    assert [(lvl, idx) for lvl, idx, _ in calls[1]] == [(0, 8)]


def test_many_inclusion_proofs_equal_single_ones_and_read_the_store_once(tmp_path: Path) -> None:
    """`inclusion_proofs` (a receipt's batch) gives exactly what `inclusion_proof` gives for
    each index, including repeated, unsorted and right-edge indexes, in one store read."""
    reads: list[int] = []

    class Counting(SQLiteNodeStore):
        def get_nodes(self, keys):  # type: ignore[no-untyped-def]
            reads.append(len(keys))
            return super().get_nodes(keys)

    conn = sqlite3.connect(tmp_path / "tlog.sqlite")
    log = MerkleLog(Counting(conn))
    log.extend(i.to_bytes(4, "big") for i in range(1000))
    for size in (1, 2, 7, 64, 999, 1000):
        indices = sorted({0, size - 1, size // 2, size // 3}) + list(range(size - 1, -1, -7))[:64] + [0]
        reads.clear()
        batch = log.inclusion_proofs(indices, size)
        assert len(reads) == (1 if size > 1 else 0)  # one store read (a 1-leaf tree needs none)
        assert batch == [log.inclusion_proof(i, size) for i in indices]
        for index, proof in zip(indices, batch, strict=True):
            verify_inclusion(leaf_hash(index.to_bytes(4, "big")), index, size, proof, log.root(size))
    assert log.inclusion_proofs([], 1000) == []
    with pytest.raises(InclusionProofError):
        log.inclusion_proofs([3, 1000], 1000)
    conn.close()


# ------------------------------------------------------------ errors


def test_generation_errors_name_the_problem(reference_log: MerkleLog) -> None:
    with pytest.raises(InclusionProofError, match="outside a tree of size 8"):
        reference_log.inclusion_proof(8)
    with pytest.raises(ProofError, match="log holds 8 leaves"):
        reference_log.inclusion_proof(0, 9)
    with pytest.raises(ConsistencyProofError, match="0 < size1 <= size2"):
        reference_log.consistency_proof(0, 8)
    with pytest.raises(ConsistencyProofError):
        reference_log.consistency_proof(5, 4)
    with pytest.raises(ProofError, match="32 bytes"):
        reference_log.append_leaf_hash(b"short")
    assert reference_log.size == 8  # the failed append left the log unchanged


def test_verification_errors_are_tlog_errors(reference_log: MerkleLog) -> None:
    proof = reference_log.inclusion_proof(3)
    with pytest.raises(TlogError, match="must have 3 hashes, got 2"):
        verify_inclusion(reference_log.leaf_hash_at(3), 3, 8, proof[:2], reference_log.root())
    with pytest.raises(InclusionProofError, match="32-byte"):
        verify_inclusion(b"x" * 31, 3, 8, proof, reference_log.root())
    with pytest.raises(InclusionProofError, match="does not lead to the given root"):
        verify_inclusion(leaf_hash(b"other"), 3, 8, proof, reference_log.root())
    with pytest.raises(ConsistencyProofError, match="the log forked"):
        verify_consistency(4, 4, reference_log.root(4), reference_log.root(5), [])


def test_proof_length_formula_matches_generated_proofs() -> None:
    log = MerkleLog()
    log.extend(bytes([i % 256]) for i in range(70))
    for size in range(1, 71):
        for index in range(size):
            assert inclusion_proof_length(index, size) == len(log.inclusion_proof(index, size))


# ------------------------------------------------------------ properties


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@st.composite
def _tree_and_index(draw: st.DrawFn) -> tuple[MerkleLog, int, int]:
    size = draw(st.integers(min_value=1, max_value=300))
    log = MerkleLog()
    log.extend(i.to_bytes(3, "big") for i in range(size))
    index = draw(st.integers(min_value=0, max_value=size - 1))
    return log, size, index


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_tree_and_index(), pick=st.integers(min_value=0, max_value=10**6), bit=st.integers(0, 255))
def test_every_inclusion_proof_verifies_and_any_bit_flip_fails(
    data: tuple[MerkleLog, int, int], pick: int, bit: int
) -> None:
    log, size, index = data
    leaf, root = log.leaf_hash_at(index), log.root(size)
    proof = log.inclusion_proof(index, size)
    assert root_from_inclusion_proof(leaf, index, size, proof) == root == root_of(
        [i.to_bytes(3, "big") for i in range(size)]
    )
    verify_inclusion(leaf, index, size, proof, root)
    with pytest.raises(InclusionProofError):
        verify_inclusion(_flip(leaf, bit), index, size, proof, root)
    with pytest.raises(InclusionProofError):
        verify_inclusion(leaf, index, size, proof, _flip(root, bit))
    if proof:
        k = pick % len(proof)
        tampered = proof[:k] + [_flip(proof[k], bit)] + proof[k + 1 :]
        with pytest.raises(InclusionProofError):
            verify_inclusion(leaf, index, size, tampered, root)
        with pytest.raises(InclusionProofError):
            verify_inclusion(leaf, index, size, proof[:-1], root)
    with pytest.raises(InclusionProofError):
        verify_inclusion(leaf, index, size, proof + [root], root)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size2=st.integers(min_value=1, max_value=300),
    frac=st.floats(min_value=0.0, max_value=1.0),
    pick=st.integers(min_value=0, max_value=10**6),
    bit=st.integers(0, 255),
)
def test_every_consistency_proof_verifies_and_any_bit_flip_fails(size2: int, frac: float, pick: int, bit: int) -> None:
    log = MerkleLog()
    log.extend(i.to_bytes(3, "big") for i in range(size2))
    size1 = max(1, min(size2, round(frac * size2)))
    root1, root2 = log.root(size1), log.root(size2)
    proof = log.consistency_proof(size1, size2)
    verify_consistency(size1, size2, root1, root2, proof)
    with pytest.raises(ConsistencyProofError):
        verify_consistency(size1, size2, _flip(root1, bit), root2, proof)
    with pytest.raises(ConsistencyProofError):
        verify_consistency(size1, size2, root1, _flip(root2, bit), proof)
    if proof:
        k = pick % len(proof)
        tampered = proof[:k] + [_flip(proof[k], bit)] + proof[k + 1 :]
        with pytest.raises(ConsistencyProofError):
            verify_consistency(size1, size2, root1, root2, tampered)
        with pytest.raises(ConsistencyProofError):
            verify_consistency(size1, size2, root1, root2, proof[:-1])
    with pytest.raises(ConsistencyProofError):
        verify_consistency(size1, size2, root1, root2, proof + [root2])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=120), st.data())
def test_a_rewritten_entry_breaks_consistency_with_the_old_root(entries: list[bytes], data: st.DataObject) -> None:
    """The reason for the whole exercise: editing history cannot be proven consistent."""
    size1 = data.draw(st.integers(min_value=1, max_value=len(entries)))
    victim = data.draw(st.integers(min_value=0, max_value=size1 - 1))
    honest = MerkleLog()
    honest.extend(entries)
    forged_entries = list(entries)
    forged_entries[victim] = entries[victim] + b"!"
    forged = MerkleLog()
    forged.extend(forged_entries + [b"more"])
    assert forged.root(size1) != honest.root(size1)
    with pytest.raises(ConsistencyProofError):
        verify_consistency(
            size1, forged.size, honest.root(size1), forged.root(), forged.consistency_proof(size1)
        )
