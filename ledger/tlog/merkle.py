"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification.

Hashing (RFC 9162 §2.1.1): leaf = SHA-256(0x00 || data), interior node =
SHA-256(0x01 || left || right), MTH of the empty tree = SHA-256("").

Why a store of complete subtrees: every hash an RFC 6962 proof needs is either a
complete (perfect, aligned) subtree or the right fold of at most log2(n) of them. So
the log keeps exactly one hash per complete subtree, keyed (level, index) — the node
covering leaves [index * 2**level, (index + 1) * 2**level). Each node is written once,
when its last leaf arrives, and never changes: the store is append-only, ~2n hashes
for n leaves, and maps directly onto a table or onto tiles. Appending is O(1)
amortised (O(log n) worst case) with no reads, because the log keeps the "frontier"
(the complete subtrees that make up the current tree) in memory. A proof is computed
as: pure index arithmetic -> the list of node keys -> one batched store read -> at most
O(log n) hashes. Verification functions need only hashes, never a tree.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Protocol

from ledger.tlog.errors import ConsistencyProofError, InclusionProofError, ProofError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

NodeKey = tuple[int, int]  # (level, index): leaves [index << level, (index + 1) << level)


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 §2.1.1 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 §2.1.1 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


# --------------------------------------------------------------------------- storage


class NodeStore(Protocol):
    """Append-only storage of complete-subtree hashes.

    Contract: `append_nodes` receives, for each appended leaf in order, the leaf node
    (0, i) followed by every parent completed by it, so within each level indexes
    arrive densely in increasing order. Stored nodes never change. `size` is the
    number of leaves. A backend that persists must write one `append_nodes` call
    atomically (all nodes and the new size, or nothing).
    """

    def size(self) -> int: ...

    def get_nodes(self, keys: Sequence[NodeKey]) -> list[bytes]: ...

    def append_nodes(self, nodes: Sequence[tuple[int, int, bytes]], new_size: int) -> None: ...


class MemoryNodeStore:
    """In-memory NodeStore: one bytearray of packed 32-byte hashes per level.

    Why bytearrays: 10**6 leaves need ~2 * 10**6 hashes; packed they take 64 MB,
    as separate bytes objects in lists they would take well over twice that.
    """

    def __init__(self) -> None:
        self._levels: list[bytearray] = []
        self._size = 0

    def size(self) -> int:
        return self._size

    def get_nodes(self, keys: Sequence[NodeKey]) -> list[bytes]:
        out: list[bytes] = []
        levels = self._levels
        for level, index in keys:
            start = index * HASH_SIZE
            if level >= len(levels) or start + HASH_SIZE > len(levels[level]) or index < 0:
                raise ProofError(f"node ({level}, {index}) is not stored; the store holds {self._size} leaves")
            out.append(bytes(levels[level][start : start + HASH_SIZE]))
        return out

    def append_nodes(self, nodes: Sequence[tuple[int, int, bytes]], new_size: int) -> None:
        levels = self._levels
        for level, index, digest in nodes:
            while level >= len(levels):
                levels.append(bytearray())
            row = levels[level]
            if index * HASH_SIZE != len(row) or len(digest) != HASH_SIZE:
                raise ProofError(f"out-of-order or malformed node ({level}, {index}); the store is append-only")
            row += digest
        self._size = new_size


_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class SQLiteNodeStore:
    """NodeStore on a SQLite table `(level, idx, hash)`; the caller owns transactions.

    Why no commit here: the journal appends a record and its tree nodes in the same
    transaction, so a crash can never leave a journaled record outside the tree.
    """

    def __init__(self, conn: sqlite3.Connection, table: str = "tlog_node") -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise ValueError(f"invalid table name {table!r}: use letters, digits and underscores")
        self._conn = conn
        self._table = table
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table} ("
            " level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,"
            " PRIMARY KEY (level, idx)) WITHOUT ROWID"
        )

    def size(self) -> int:
        row = self._conn.execute(f"SELECT max(idx) FROM {self._table} WHERE level = 0").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def get_nodes(self, keys: Sequence[NodeKey]) -> list[bytes]:
        found: dict[NodeKey, bytes] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 200):  # one query per proof; bounded OR depth and variables
            chunk = unique[start : start + 200]
            rows = self._conn.execute(
                f"SELECT level, idx, hash FROM {self._table} WHERE "
                + " OR ".join("(level = ? AND idx = ?)" for _ in chunk),
                [n for key in chunk for n in key],
            )
            for level, index, digest in rows:
                found[(level, index)] = bytes(digest)
        missing = [key for key in unique if key not in found]
        if missing:
            raise ProofError(f"node {missing[0]} is not stored in table {self._table}")
        return [found[key] for key in keys]

    def append_nodes(self, nodes: Sequence[tuple[int, int, bytes]], new_size: int) -> None:
        self._conn.executemany(
            f"INSERT INTO {self._table} (level, idx, hash) VALUES (?, ?, ?)",
            [(level, index, bytes(digest)) for level, index, digest in nodes],
        )


# ---------------------------------------------------------------- index arithmetic


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2): RFC 9162's k."""
    return 1 << ((n - 1).bit_length() - 1)


def _range_nodes(begin: int, end: int) -> list[NodeKey]:
    """Complete subtrees covering [begin, end), largest (leftmost) first.

    Valid for every range RFC 6962 recursion produces: begin is a multiple of the
    smallest power of two >= end - begin, so each piece is aligned.
    """
    keys: list[NodeKey] = []
    while begin < end:
        level = (end - begin).bit_length() - 1
        keys.append((level, begin >> level))
        begin += 1 << level
    return keys


def _fold(hashes: Sequence[bytes]) -> bytes:
    """MTH of a range from its complete subtrees: the RFC split puts the biggest left."""
    acc = hashes[-1]
    for left in reversed(hashes[:-1]):
        acc = node_hash(left, acc)
    return acc


def inclusion_path_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTHs form PATH(index, D[0:size]) (RFC 9162 §2.1.3.1), leaf upward."""
    if not 0 <= index < size:
        raise InclusionProofError(f"leaf index {index} is outside a tree of size {size}")
    ranges: list[tuple[int, int]] = []
    begin, end = 0, size
    while end - begin > 1:
        mid = begin + _split(end - begin)
        if index < mid:
            ranges.append((mid, end))
            end = mid
        else:
            ranges.append((begin, mid))
            begin = mid
    ranges.reverse()
    return ranges


def consistency_path_ranges(size1: int, size2: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTHs form PROOF(size1, D[0:size2]) (RFC 9162 §2.1.4.1)."""
    if not 0 < size1 <= size2:
        raise ConsistencyProofError(
            f"no consistency proof from size {size1} to size {size2}: need 0 < size1 <= size2"
        )
    ranges: list[tuple[int, int]] = []
    begin, end, whole = 0, size2, True  # whole: SUBPROOF's flag b
    while size1 != end:
        mid = begin + _split(end - begin)
        if size1 <= mid:
            ranges.append((mid, end))
            end = mid
        else:
            ranges.append((begin, mid))
            begin, whole = mid, False
    if not whole:
        ranges.append((begin, end))
    ranges.reverse()
    return ranges


# ----------------------------------------------------------------------- the log


class MerkleLog:
    """An append-only RFC 6962 Merkle tree over a NodeStore.

    Not thread-safe: use one instance per thread (and per SQLite connection). Stored
    nodes never change, so other instances over the same store can serve roots and
    proofs for any size already written while one writer appends.
    """

    def __init__(self, store: NodeStore | None = None) -> None:
        self._store: NodeStore = store if store is not None else MemoryNodeStore()
        self._size = self._store.size()
        keys = _range_nodes(0, self._size)
        self._frontier_keys: list[NodeKey] = keys
        self._frontier: list[bytes] = self._store.get_nodes(keys) if keys else []

    @property
    def size(self) -> int:
        return self._size

    @property
    def store(self) -> NodeStore:
        return self._store

    def append(self, data: bytes) -> int:
        """Append one entry (hashed as an RFC 6962 leaf); return its index."""
        return self.append_leaf_hash(leaf_hash(data))

    def append_leaf_hash(self, digest: bytes) -> int:
        """Append one precomputed leaf hash; return its index."""
        index = self._size
        self.extend_leaf_hashes((digest,))
        return index

    def extend(self, entries: Iterable[bytes]) -> int:
        """Append many entries in one store write; return the new size."""
        return self.extend_leaf_hashes(leaf_hash(e) for e in entries)

    def extend_leaf_hashes(self, digests: Iterable[bytes]) -> int:
        """Append many leaf hashes in one store write; return the new size."""
        nodes: list[tuple[int, int, bytes]] = []
        frontier = list(self._frontier)
        fkeys = list(self._frontier_keys)
        size = self._size
        for digest in digests:
            digest = bytes(digest)
            if len(digest) != HASH_SIZE:
                raise ProofError(f"leaf hash must be {HASH_SIZE} bytes, got {len(digest)}")
            level, index, acc = 0, size, digest
            nodes.append((0, index, acc))
            while index & 1:  # a left sibling at this level exists: it is the last frontier node
                acc = node_hash(frontier.pop(), acc)
                fkeys.pop()
                level += 1
                index >>= 1
                nodes.append((level, index, acc))
            frontier.append(acc)
            fkeys.append((level, index))
            size += 1
        if nodes:
            self._store.append_nodes(nodes, size)
            self._size, self._frontier, self._frontier_keys = size, frontier, fkeys
        return self._size

    def _check_size(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise ProofError(f"tree size {size} is not available: the log holds {self._size} leaves")
        return size

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first `size` leaves (default: all)."""
        size = self._check_size(size)
        if size == 0:
            return EMPTY_ROOT
        if size == self._size:
            return _fold(self._frontier)
        return _fold(self._store.get_nodes(_range_nodes(0, size)))

    def leaf_hash_at(self, index: int) -> bytes:
        if not 0 <= index < self._size:
            raise ProofError(f"leaf index {index} is outside the log of size {self._size}")
        return self._store.get_nodes([(0, index)])[0]

    def _hashes_for(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return self._hashes_for_many([ranges])[0]

    def _hashes_for_many(self, paths: Sequence[Sequence[tuple[int, int]]]) -> list[list[bytes]]:
        """The MTH of every range of every path: one store read for all their nodes, and
        each distinct range folded once (paths of nearby leaves share their upper ranges)."""
        distinct = list(dict.fromkeys(r for ranges in paths for r in ranges))
        per_range = [_range_nodes(b, e) for b, e in distinct]
        flat = [k for keys in per_range for k in keys]
        fetched = self._store.get_nodes(flat) if flat else []
        folded: dict[tuple[int, int], bytes] = {}
        pos = 0
        for span, keys in zip(distinct, per_range, strict=True):
            folded[span] = _fold(fetched[pos : pos + len(keys)])
            pos += len(keys)
        return [[folded[r] for r in ranges] for ranges in paths]

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[0:size]) per RFC 9162 §2.1.3.1, sibling of the leaf first."""
        size = self._check_size(size)
        return self._hashes_for(inclusion_path_ranges(index, size))

    def inclusion_proofs(self, indices: Sequence[int], size: int | None = None) -> list[list[bytes]]:
        """`inclusion_proof` of each index against one tree size, in order.

        Why: a receipt proves up to 64 readings at once; proved one by one, each proof
        paid its own store query for nodes the others also need.
        """
        size = self._check_size(size)
        return self._hashes_for_many([inclusion_path_ranges(i, size) for i in indices])

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """PROOF(size1, D[0:size2]) per RFC 9162 §2.1.4.1 (empty when size1 == size2)."""
        size2 = self._check_size(size2)
        return self._hashes_for(consistency_path_ranges(size1, size2))


def root_of(entries: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of raw entries, straight from the RFC 9162 §2.1.1 definition (for checks)."""
    if not entries:
        return EMPTY_ROOT
    hashes = [leaf_hash(e) for e in entries]
    while len(hashes) > 1:
        paired = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes) - 1, 2)]
        if len(hashes) % 2:
            paired.append(hashes[-1])
        hashes = paired
    return hashes[0]


# ------------------------------------------------------------------- verification


def _need_hash(value: bytes, what: str, error: type[ProofError]) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != HASH_SIZE:
        size = len(value) if isinstance(value, (bytes, bytearray, memoryview)) else type(value).__name__
        raise error(f"{what} must be a {HASH_SIZE}-byte SHA-256 hash, got {size}")
    return bytes(value)


def inclusion_proof_length(index: int, size: int) -> int:
    """Number of hashes in PATH(index, D[0:size]), from index arithmetic alone."""
    if not 0 <= index < size:
        raise InclusionProofError(f"leaf index {index} is outside a tree of size {size}")
    inner = (index ^ (size - 1)).bit_length()
    return inner + bin(index >> inner).count("1")


def root_from_inclusion_proof(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root an inclusion proof implies, by RFC 9162 §2.1.3.2; raises if it is malformed."""
    expected = inclusion_proof_length(index, size)
    r = _need_hash(leaf, "leaf hash", InclusionProofError)
    path = [_need_hash(p, f"inclusion proof hash #{i}", InclusionProofError) for i, p in enumerate(proof)]
    if len(path) != expected:
        raise InclusionProofError(
            f"inclusion proof for leaf {index} in a tree of size {size} must have {expected} hashes, got {len(path)}"
        )
    fn, sn = index, size - 1
    for p in path:
        if sn == 0:
            raise InclusionProofError("inclusion proof is longer than the tree is high")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InclusionProofError("inclusion proof is shorter than the tree is high")
    return r


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that `leaf` is entry `index` of the tree of `size` with `root`; raise otherwise."""
    computed = root_from_inclusion_proof(leaf, index, size, proof)
    if not hmac.compare_digest(computed, bytes(root)):
        raise InclusionProofError(
            f"inclusion proof for leaf {index} does not lead to the given root of the tree of size {size}: "
            "the leaf, the proof or the root is wrong"
        )


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]) -> None:
    """Check that the tree (size2, root2) extends (size1, root1), by RFC 9162 §2.1.4.2.

    Edge cases, matching the published transparency-dev probes: size1 == 0 is
    refused (every tree extends the empty one; there is nothing to prove);
    size1 == size2 needs an empty proof and equal roots.
    """
    if size1 < 0 or size2 < size1:
        raise ConsistencyProofError(f"size2 ({size2}) must be >= size1 ({size1}) >= 0")
    if size1 == 0:
        raise ConsistencyProofError(
            "a consistency proof from the empty tree is meaningless: accept any tree without a proof instead"
        )
    if size1 == size2:
        if len(proof) != 0:
            raise ConsistencyProofError("sizes are equal, so the proof must be empty")
        if not hmac.compare_digest(bytes(root1), bytes(root2)):
            raise ConsistencyProofError(f"two different roots for the same tree size {size1}: the log forked")
        return
    path = [_need_hash(p, f"consistency proof hash #{i}", ConsistencyProofError) for i, p in enumerate(proof)]
    expected = len(consistency_path_ranges(size1, size2))
    if len(path) != expected:
        raise ConsistencyProofError(
            f"consistency proof from size {size1} to {size2} must have {expected} hashes, got {len(path)}"
        )
    # RFC 9162 §2.1.4.2, steps 1-7.
    if size1 & (size1 - 1) == 0:  # size1 is an exact power of 2
        path = [bytes(root1)] + path
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ConsistencyProofError("consistency proof is longer than the tree is high")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ConsistencyProofError("consistency proof is shorter than the tree is high")
    if not hmac.compare_digest(fr, bytes(root1)):
        raise ConsistencyProofError(
            f"consistency proof does not lead to the first root (size {size1}): wrong proof or the log forked"
        )
    if not hmac.compare_digest(sr, bytes(root2)):
        raise ConsistencyProofError(
            f"consistency proof does not lead to the second root (size {size2}): wrong proof or the log forked"
        )
