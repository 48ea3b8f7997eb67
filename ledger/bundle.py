"""Self-contained audit bundles: `edge-audit export --bundle` and `edge-audit verify --bundle`.

Why: an auditor (or a regulator, or an agent's owner) must be able to check records
offline, with no journal and no chain: the bundle carries each record's fields, its
C2SP tlog-proof (inclusion path + the signed, possibly cosigned checkpoint), every
stored checkpoint with a consistency proof to the newest one (so any pinned checkpoint
can be checked against it), the chain anchoring data of each checkpoint (to look up
later), the signed envelopes still held and the signers' certificates.

Format: one JSON object, "format": "edgeledger-audit-bundle/1". Each record carries its
RFC 6962 inclusion path ("inclusion": base64 hashes, leaf sibling first) against the
bundle's one "checkpoint"; record + index + path + checkpoint are exactly a C2SP
tlog-proof (`tlog_proof(bundle, record)` renders it), stored once instead of per record.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import IO, Any

from ledger import witnesses
from ledger.audit import (
    HISTORY_FAILURES,
    AuditReport,
    Filters,
    LogPolicy,
    SignatureVerifier,
    _check_envelope_bytes,
)
from ledger.journal import CONFIRMED, Journal
from ledger.record import RECORD_FIELDS, canonical_json_of
from ledger.tlog.checkpoint import Checkpoint, open_checkpoint
from ledger.tlog.errors import TlogError
from ledger.tlog.merkle import MemoryNodeStore, MerkleLog, leaf_hash, verify_consistency, verify_inclusion
from ledger.tlog.note import Ed25519Verifier, split_note
from ledger.tlog.proof import ProofBundle

FORMAT = "edgeledger-audit-bundle/1"
_ANCHOR = ("anchor_state", "tx_hash", "block_number", "block_hash", "chain_id", "contract")


class BundleError(ValueError):
    """The bundle cannot be read (not JSON, wrong format)."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def export_bundle(journal: Journal, out: IO[str], filters: Filters | None = None, log_vkey: str | None = None) -> int:
    """Write a bundle of the matching records, proven against the newest anchored checkpoint
    (the newest signed one when none is anchored yet). Returns the number of records."""
    target = journal.latest_checkpoint(anchored=True) or journal.latest_checkpoint()
    if target is None:
        raise BundleError("the journal has no signed checkpoint yet: start the coordinator (it signs one a second)")
    size = target["size"]
    tree = _memory_tree(journal)
    checkpoints = journal.checkpoints_up_to(size)
    records, fingerprints = [], set()
    filters = filters or Filters()
    for row in journal.find(**filters.criteria()):
        index = row.get("log_index")
        item: dict[str, Any] = {name: row[name] for name in RECORD_FIELDS}
        item.update(digest=row["digest"], log_index=index, erased=row.get("erased_at") is not None,
                    envelope=_b64(bytes(row["envelope"])) if row.get("envelope") is not None else None)
        if index is not None and index < size:
            item["inclusion"] = [_b64(h) for h in tree.inclusion_proof(index, size)]
        else:
            item["inclusion"] = None  # journaled after the checkpoint: not provable yet
        if row.get("signer_fingerprint"):
            fingerprints.add(row["signer_fingerprint"])
        records.append(item)
    bundle = {
        "format": FORMAT,
        "origin": target["note"].split("\n", 1)[0],
        "log_vkey": log_vkey,
        "checkpoint": journal.cosigned_note(size, target["note"]),
        "checkpoints": [{"size": c["size"], "note": c["note"], "anchor": {k: c[k] for k in _ANCHOR},
                         "consistency": [_b64(h) for h in tree.consistency_proof(c["size"], size)]}
                        for c in checkpoints],
        "records": records,
        "witnesses": _witness_evidence(journal, tree, size),
        "cosigned": _cosigned(journal, tree, size),
        "certificates": {fp: pem for fp in sorted(fingerprints) if (pem := journal.certificate(fp)) is not None},
    }
    json.dump(bundle, out, sort_keys=True)
    out.write("\n")
    return len(records)


def _witness_evidence(journal: Journal, tree: MerkleLog, size: int) -> list[dict[str, Any]]:
    """Each agent witness key with the signed cosign task that binds it to the agent's certificate."""
    return [{"agent_id": b["agent_id"], "vkey": b["vkey"], "task_id": b["task_id"], "certificate": b["certificate"],
             "envelope": _b64(b["envelope"]) if b["envelope"] is not None else None}
            for b in witnesses.journal_bindings(journal)]


def _cosigned(journal: Journal, tree: MerkleLog, size: int) -> list[dict[str, Any]]:
    """Per agent, its cosignature of the largest checkpoint it cosigned, with that checkpoint and a
    consistency proof between it and the bundle's checkpoint (either order)."""
    newest: dict[str, dict[str, Any]] = {}
    for c in journal.all_cosignatures():
        if c["size"] <= tree.size:
            newest[c["agent_id"]] = c  # ordered by size: the last one is the largest
    out = []
    for agent, c in sorted(newest.items()):
        row = journal.checkpoints("size = ?", (c["size"],))
        if not row:
            continue
        lo, hi = sorted((c["size"], size))
        out.append({"agent_id": agent, "size": c["size"], "note": row[0]["note"], "line": c["line"],
                    "consistency": [_b64(h) for h in tree.consistency_proof(lo, hi)] if lo < hi else []})
    return out


def _memory_tree(journal: Journal) -> MerkleLog:
    """The journal's stored tree copied into memory: one query instead of one per proof."""
    store = MemoryNodeStore()
    cur = journal.tree_nodes()
    size = journal.tree_size()
    while True:
        chunk = cur.fetchmany(50_000)
        if not chunk:
            break
        store.append_nodes([(level, idx, bytes(h)) for level, idx, h in chunk], size)
    return MerkleLog(store)


def tlog_proof(data: dict[str, Any], item: dict[str, Any]) -> str:
    """The C2SP tlog-proof of one bundled record."""
    return ProofBundle(int(item["log_index"]), tuple(base64.b64decode(h) for h in item["inclusion"]),
                       data["checkpoint"]).format()


def load_bundle(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BundleError(f"bundle is not JSON ({exc}): pass a file written by `edge-audit export --bundle`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"not an audit bundle (format must be {FORMAT!r})")
    return data


def bundle_verifier(data: dict[str, Any]) -> Ed25519Verifier:
    """The log key the bundle names (trust on first use: pin it, or pass --log-key)."""
    if not data.get("log_vkey"):
        raise BundleError("the bundle names no log key: pass --log-key FILE (the coordinator's pki/log.pub)")
    return Ed25519Verifier.from_vkey(data["log_vkey"])


def verify_bundle(data: dict[str, Any], policy: LogPolicy, *, check_signatures: bool = True,
                  verifier: SignatureVerifier | None = None) -> AuditReport:
    """Offline: checkpoint signatures and witness quorum, consistency (also with the pin), every
    record's leaf against its inclusion proof, envelopes and signatures. No journal, no chain."""
    log_verifier = policy.log_verifier
    report = AuditReport(origin=log_verifier.name)
    if check_signatures and verifier is None:
        report.signature_note = "signatures not checked: security.envelope.verify_envelope_signature unavailable"
    elif not check_signatures:
        report.signature_note = "signatures not checked (--no-signatures)"
    try:
        target, _ = open_checkpoint(data["checkpoint"], log_verifier, others=tuple(policy.witnesses))
    except TlogError as exc:
        report.add(None, "checkpoint_signature_invalid", f"the bundle's checkpoint: {exc}")
        return report
    report.tree_size = target.size
    if policy.quorum:
        _check_bundle_quorum(data, policy, report, target)
    proofs: dict[int, list[bytes]] = {}
    for item in data.get("checkpoints", []):
        report.checkpoints += 1
        try:
            cp, _ = open_checkpoint(item["note"], log_verifier)
            proof = [base64.b64decode(h) for h in item["consistency"]]
            if cp.size:
                verify_consistency(cp.size, target.size, cp.root_hash, target.root_hash, proof)
            proofs[cp.size] = proof
        except TlogError as exc:
            report.add(None, "checkpoint_inconsistent", f"checkpoint of size {item.get('size')}: {exc}")
            continue
        if (item.get("anchor") or {}).get("anchor_state") == CONFIRMED:
            report.anchored_checkpoints += 1
    if policy.pins is not None:
        pin = policy.pins.get(report.origin)
        if pin is not None and pin.size != target.size and pin.size not in proofs and pin.size <= target.size:
            report.add(None, "pin_unverifiable", f"the bundle has no consistency proof from the pinned size {pin.size}: "
                                                 "export a bundle that includes that checkpoint")
        else:
            for kind, detail in policy.pins.check(report.origin, log_verifier.vkey, target.size, target.root_hash,
                                                  lambda a, b: proofs[a]):
                report.add(None, kind, detail)
        report.pinned = {"size": pin.size} if pin else None
    certificates: dict[str, str] = data.get("certificates", {})
    for item in data.get("records", []):
        report.rows += 1
        task_id = item.get("task_id")
        entry = canonical_json_of(item)
        if hashlib.sha256(entry).hexdigest() != item.get("digest"):
            report.add(task_id, "journal_digest_mismatch", "the record's fields do not hash to its digest")
        if item.get("erased"):
            report.erased += 1
        if item.get("inclusion") is None:
            report.unanchored += 1
        else:
            try:
                index = item.get("log_index")
                if not isinstance(index, int) or isinstance(index, bool):
                    raise TlogError(f"log index {index!r} is not an integer")
                path = [base64.b64decode(h, validate=True) for h in item["inclusion"]]
                verify_inclusion(leaf_hash(entry), index, target.size, path, target.root_hash)
                report.on_chain += 1
            except (TlogError, ValueError, TypeError) as exc:
                report.add(task_id, "record_not_in_log", f"record is not in the signed log: {exc}")
        envelope = base64.b64decode(item["envelope"]) if item.get("envelope") else None
        _check_envelope_bytes(envelope, item, certificates.get(item.get("signer_fingerprint") or ""), report,
                              check_signatures, verifier)
    return report


def _check_bundle_quorum(data: dict[str, Any], policy: LogPolicy, report: AuditReport, target: Checkpoint) -> None:
    """Offline witness quorum: each bundled cosignature's checkpoint must verify and be consistent
    with the bundle's checkpoint; then the same counting as the journal audit (ledger/witnesses.py)."""
    if policy.witnesses:
        counted = [witnesses.Witness(w.name, w) for w in policy.witnesses]
    else:
        verify, payload_of = witnesses.default_tools()
        counted, refused = witnesses.bound_witnesses(witnesses.bundle_bindings(data.get("witnesses") or []),
                                                     verify, payload_of)
        for agent, why in refused:
            report.add(None, "witness_key_unbound", f"witness key of {agent!r} not counted: {why}")
    notes: dict[int, str] = {target.size: data["checkpoint"]}
    rows: list[dict[str, Any]] = []
    for sig in split_note(data["checkpoint"])[1]:
        rows.append({"size": target.size, "line": sig.line()})
    for item in data.get("cosigned") or []:
        try:
            cp, _ = open_checkpoint(item["note"], policy.log_verifier)
            proof = [base64.b64decode(h) for h in item["consistency"]]
            (lo, lo_root), (hi, hi_root) = sorted(((cp.size, cp.root_hash), (target.size, target.root_hash)))
            if lo:
                verify_consistency(lo, hi, lo_root, hi_root, proof)
        except (TlogError, KeyError, ValueError) as exc:
            report.add(None, "checkpoint_inconsistent", f"cosigned checkpoint of size {item.get('size')}: {exc}")
            continue
        notes[cp.size] = item["note"]
        rows.append({"size": cp.size, "line": item.get("line", "")})
    report.witness_report(counted, witnesses.reach(counted, rows, notes), policy.quorum)


def pin_after(report: AuditReport) -> bool:
    """Whether the pin may move forward: the signed history itself checked out."""
    return not any(f.kind in HISTORY_FAILURES or f.kind == "pin_unverifiable" for f in report.findings)
