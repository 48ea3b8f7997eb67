"""Transparency-log micro-benchmark: appending leaves, proof sizes and proof rates.

Run: .venv/bin/python bench/tlog.py [--leaves 1000000] [--sqlite-leaves 100000] [--samples 20000]
                                     [--peer-leaves 100000]
Single process, no services. Peer: pymerkle (test extra) doing the same appends and
proofs in the same run. Bounded: about a minute on a 2-core host at the defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import resource
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger.tlog.checkpoint import Checkpoint, open_checkpoint
from ledger.tlog.cosignature import CosignatureV1Signer, open_cosigned_checkpoint
from ledger.tlog.merkle import (
    MerkleLog,
    SQLiteNodeStore,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from ledger.tlog.note import Ed25519Signer, sign_note
from ledger.tlog.proof import ProofBundle


def rate(label: str, count: int, fn: Callable[[int], object]) -> None:
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    elapsed = time.perf_counter() - start
    print(f"  {label:<46} {count / elapsed:>12,.0f} /s  {elapsed / count * 1e6:>9.1f} us each")


def leaves(n: int, offset: int = 0) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(offset, offset + n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--sqlite-leaves", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--peer-leaves", type=int, default=100_000)
    args = parser.parse_args()
    n, samples = args.leaves, args.samples
    rng = random.Random(1)
    print(f"python {sys.version.split()[0]}, {n:,} leaves in memory, {args.sqlite_leaves:,} in SQLite")

    print("append (leaf hashes precomputed; in-memory store)")
    data = leaves(n)
    log = MerkleLog()
    start = time.perf_counter()
    for i in range(0, n, 1000):
        log.extend_leaf_hashes(data[i : i + 1000])
    elapsed = time.perf_counter() - start
    print(f"  {'extend, batches of 1000':<46} {n / elapsed:>12,.0f} /s  total {elapsed:.2f} s")
    single = MerkleLog()
    count = min(n, 100_000)
    start = time.perf_counter()
    for digest in data[:count]:
        single.append_leaf_hash(digest)
    elapsed = time.perf_counter() - start
    print(f"  {'append_leaf_hash, one at a time':<46} {count / elapsed:>12,.0f} /s  ({count:,} leaves)")
    start = time.perf_counter()
    for i in range(count):
        leaf_hash(i.to_bytes(8, "big") * 8)
    print(f"  {'leaf_hash of a 64-byte entry':<46} {count / (time.perf_counter() - start):>12,.0f} /s")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  max RSS of the process after both logs: {maxrss:.0f} MB")

    root = log.root()
    print(f"proof sizes at {n:,} leaves")
    idx = [rng.randrange(n) for _ in range(samples)]
    lengths = [len(log.inclusion_proof(i)) for i in idx[:2000]]
    print(f"  inclusion proof: {min(lengths)}-{max(lengths)} hashes ({max(lengths) * 32} bytes max), "
          f"mean {sum(lengths) / len(lengths):.1f}")
    olds = [rng.randrange(1, n) for _ in range(samples)]
    clens = [len(log.consistency_proof(m)) for m in olds[:2000]]
    print(f"  consistency proof (random old size): {min(clens)}-{max(clens)} hashes, "
          f"mean {sum(clens) / len(clens):.1f}")
    log_key = Ed25519Signer.generate("edgeledger.local/records")
    witnesses = [CosignatureV1Signer.generate(f"agent-{i}") for i in range(3)]
    cp = Checkpoint(log_key.name, n, root)
    signed = sign_note(cp.body(), [log_key, *witnesses])
    bundle = ProofBundle(idx[0], tuple(log.inclusion_proof(idx[0])), signed).format()
    print(f"  checkpoint with log signature + 3 cosignatures: {len(signed.encode())} bytes; "
          f"tlog-proof bundle: {len(bundle.encode())} bytes")

    print(f"rates at {n:,} leaves (random index / old size)")
    proofs = [log.inclusion_proof(i) for i in idx[:samples]]
    hashes = log.store.get_nodes([(0, i) for i in idx[:samples]])
    rate("inclusion proof generation", samples, lambda k: log.inclusion_proof(idx[k]))
    rate("inclusion proof verification", samples, lambda k: verify_inclusion(hashes[k], idx[k], n, proofs[k], root))
    cproofs = [log.consistency_proof(m) for m in olds[:samples]]
    roots = [log.root(m) for m in olds[:samples]]
    rate("root of an older size", samples, lambda k: log.root(olds[k]))
    rate("consistency proof generation", samples, lambda k: log.consistency_proof(olds[k]))
    rate("consistency proof verification", samples,
         lambda k: verify_consistency(olds[k], n, roots[k], root, cproofs[k]))
    rate("checkpoint sign (Ed25519 note)", 2000, lambda k: sign_note(cp.body(), [log_key]))
    rate("checkpoint open (log signature only)", 2000, lambda k: open_checkpoint(signed, log_key.verifier()))
    verifiers = [w.verifier() for w in witnesses]
    rate("cosigned checkpoint open (log + 3 witnesses)", 2000,
         lambda k: open_cosigned_checkpoint(signed, log_key.verifier(), verifiers, quorum=3))
    log = single = data = proofs = cproofs = None  # type: ignore[assignment]  # free the in-memory logs

    m = args.sqlite_leaves
    print(f"SQLite store (file, WAL, one transaction per batch of 1000) at {m:,} leaves")
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "tlog.sqlite")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        slog = MerkleLog(SQLiteNodeStore(conn))
        sdata = leaves(m)
        start = time.perf_counter()
        for i in range(0, m, 1000):
            with conn:
                slog.extend_leaf_hashes(sdata[i : i + 1000])
        elapsed = time.perf_counter() - start
        print(f"  {'extend, batches of 1000':<46} {m / elapsed:>12,.0f} /s  total {elapsed:.2f} s")
        sidx = [rng.randrange(m) for _ in range(5000)]
        rate("inclusion proof generation", 5000, lambda k: slog.inclusion_proof(sidx[k]))
        rate("consistency proof generation", 5000, lambda k: slog.consistency_proof(sidx[k] + 1))
        # a receipt's witness part: 64 recent readings of one agent among three (every third leaf)
        recent = [[max(0, m - 3000) + (3 * j + k % 3) % min(m, 3000) for j in range(64)] for k in range(200)]
        rate("64 receipt proofs, one by one (per 64)", 200, lambda k: [slog.inclusion_proof(i) for i in recent[k]])
        rate("64 receipt proofs, inclusion_proofs (per 64)", 200, lambda k: slog.inclusion_proofs(recent[k]))
        start = time.perf_counter()
        reopened = MerkleLog(SQLiteNodeStore(conn))
        print(f"  reopen (load frontier): {(time.perf_counter() - start) * 1e3:.2f} ms, size {reopened.size:,}")
        conn.close()

    peer(args.peer_leaves, rng)


def peer(count: int, rng: random.Random) -> None:
    """The same operations on pymerkle 7 (test extra), an independent RFC 6962 tree, same run."""
    try:
        import pymerkle
    except ImportError:
        print("peer: pymerkle not installed (pip install -e '.[test]')")
        return
    print(f"peer: pymerkle {getattr(pymerkle, '__version__', '7')} InmemoryTree vs MerkleLog, {count:,} entries")
    entries = [i.to_bytes(8, "big") for i in range(count)]
    theirs = pymerkle.InmemoryTree(algorithm="sha256")
    start = time.perf_counter()
    for entry in entries:
        theirs.append_entry(entry)
    their_append = count / (time.perf_counter() - start)
    ours = MerkleLog()
    start = time.perf_counter()
    for entry in entries:
        ours.append(entry)
    our_append = count / (time.perf_counter() - start)
    assert theirs.get_root() == ours.root()
    idx = [rng.randrange(count) for _ in range(2000)]
    olds = [rng.randrange(1, count) for _ in range(2000)]

    def timed(fn: Callable[[int], object]) -> float:
        start = time.perf_counter()
        for k in range(len(idx)):
            fn(k)
        return len(idx) / (time.perf_counter() - start)

    rows = [
        ("append one entry", their_append, our_append),
        ("inclusion proof generation", timed(lambda k: theirs.prove_inclusion(idx[k] + 1)),
         timed(lambda k: ours.inclusion_proof(idx[k]))),
        ("consistency proof generation", timed(lambda k: theirs.prove_consistency(olds[k])),
         timed(lambda k: ours.consistency_proof(olds[k]))),
    ]
    for label, theirs_rate, ours_rate in rows:
        print(f"  {label:<32} pymerkle {theirs_rate:>10,.0f} /s   tlog {ours_rate:>10,.0f} /s"
              f"   ratio {ours_rate / theirs_rate:.1f}x")


if __name__ == "__main__":
    main()
