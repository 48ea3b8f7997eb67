"""Audit queries behind `edge-audit`: list, show, verify, reconcile, export.

Why verify trusts neither the coordinator nor its database: every record is a leaf of
an RFC 6962 log; the auditor recomputes every leaf from the record's fields, rebuilds
the tree (which checks every record's inclusion at once) and compares it with the
checkpoints signed by the log key, checks that successive checkpoints extend each
other (consistency proofs) and the auditor's own pinned one, requires the witness
quorum it is told to, and reads the chain itself (chunked `eth_getLogs`) for the
checkpoints anchored by the journal's known recorders. Signed envelopes are re-verified
with the stored signer certificate through a `SignatureVerifier`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from eth_utils import to_checksum_address
from web3 import Web3

from ledger import contract
from ledger.contract import CheckpointEvent
from ledger.journal import CONFIRMED, Journal, certificate_fingerprint
from ledger.pins import PinStore
from ledger.record import RECORD_FIELDS, ExecutionRecord, canonical_json_of
from ledger.rpc import LOG_CHUNK, scan_events
from ledger.tlog.checkpoint import open_checkpoint
from ledger.tlog.cosignature import CosignatureV1Verifier
from ledger.tlog.errors import TlogError
from ledger.tlog.merkle import MemoryNodeStore, MerkleLog, leaf_hash, verify_consistency
from ledger.tlog.note import Ed25519Verifier, split_note
from ledger.tlog.proof import ProofBundle

EXPORT_FIELDS = (
    "task_id", "task_name", "agent_id", "status", "received_at", "started_at", "finished_at",
    "signer_fingerprint", "args_digest", "result_digest", "envelope_digest", "digest",
    "anchor_state", "tx_hash", "block_number", "block_hash", "chain_id", "contract", "log_index", "erased_at",
)


class SignatureVerifier(Protocol):
    """Raises on a bad signature; returns None when `envelope` was signed by the cert's key."""

    def __call__(self, envelope: bytes, certificate_pem: str) -> None: ...


def default_verifier() -> SignatureVerifier:
    """security.envelope.verify_envelope_signature, reusing parsed certificates for one audit run."""
    from security.envelope import CertificateCache, verify_envelope_signature

    certificates = CertificateCache()

    def verify(envelope: bytes, certificate_pem: str) -> None:
        verify_envelope_signature(envelope, certificate_pem, cache=certificates)

    return verify


class AuditError(RuntimeError):
    """The audit cannot run as configured (missing journal, chain unreachable...)."""


# -- list / show / export ----------------------------------------------------------------
@dataclass(frozen=True)
class Filters:
    agent: str | None = None
    task_name: str | None = None
    status: str | None = None
    anchor_state: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None

    def criteria(self) -> dict[str, Any]:
        """These filters as the keyword arguments of Journal.find."""
        return {"agent_id": self.agent, "task_name": self.task_name, "status": self.status,
                "anchor_state": self.anchor_state, "since": self.since, "until": self.until, "limit": self.limit}


COMMAND_RESULT_TASK = "edge.command_result"
COMMAND_FIELDS = ("command", "command_task_id", "command_args_digest")


def list_records(journal: Journal, filters: Filters = Filters()) -> list[dict[str, Any]]:
    rows = [_public(r) for r in journal.find(**filters.criteria())]
    _add_commands(journal, rows)
    return rows


def _add_commands(journal: Journal, rows: list[dict[str, Any]]) -> None:
    """Name the command each command result answered (and the digest of its args), so an
    auditor sees WHICH command failed, not only that a command result was journaled."""
    answered = journal.commands_answered(r["task_id"] for r in rows if r["task_name"] == COMMAND_RESULT_TASK)
    for row in rows:
        if row["task_name"] == COMMAND_RESULT_TASK:
            row.update(answered.get(row["task_id"]) or dict.fromkeys(COMMAND_FIELDS))


def _public(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in EXPORT_FIELDS}
    out["has_envelope"] = row.get("envelope") is not None
    return out


def show(journal: Journal, task_id: str) -> dict[str, Any] | None:
    row = journal.get(task_id)
    if row is None:
        return None
    out = _public(row)
    _add_commands(journal, [out])
    record = ExecutionRecord.from_mapping(row)
    out["canonical_json"] = record.canonical_json().decode()
    out["recomputed_digest"] = record.digest().hex()
    out["task_key"] = "0x" + record.task_key.hex()
    out["agent_key"] = "0x" + record.agent_key.hex()
    out["certificate_stored"] = bool(row.get("signer_fingerprint")) and journal.certificate(row["signer_fingerprint"]) is not None
    out["erased"] = row.get("erased_at") is not None
    index = row.get("log_index")
    out["leaf_hash"] = leaf_hash(record.canonical_json()).hex()
    cp = None
    if index is not None:
        cp = journal.first_anchored_checkpoint_above(index) or journal.latest_checkpoint()
    if cp is not None and index is not None and index < cp["size"]:
        proof = journal.merkle().inclusion_proof(index, cp["size"])
        out["inclusion_proof"] = ProofBundle(index, tuple(proof), journal.cosigned_note(cp["size"], cp["note"])).format()
        out["checkpoint_size"] = cp["size"]
        out["checkpoint_anchor"] = {k: cp[k] for k in ("anchor_state", "tx_hash", "block_number", "block_hash",
                                                         "chain_id", "contract")}
    else:
        out["inclusion_proof"] = None
    return out


def export(journal: Journal, out: IO[str], fmt: str = "jsonl", filters: Filters = Filters()) -> int:
    """Write rows (without envelope bytes) as JSONL or CSV; returns the row count."""
    rows = list_records(journal, filters)
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=[*EXPORT_FIELDS, "has_envelope", *COMMAND_FIELDS])
        writer.writeheader()
        writer.writerows(rows)
    else:
        raise AuditError(f"unknown export format {fmt!r}: use jsonl or csv")
    return len(rows)


# -- chain events ----------------------------------------------------------------------
def fetch_events(w3: Web3, contract_address: str, origin: str | None = None, from_block: int = 0,
                 to_block: int | None = None, chunk: int = LOG_CHUNK,
                 progress: Callable[[int, int], None] | None = None) -> list[CheckpointEvent]:
    """CheckpointAnchored events of the contract (any sender), for one log origin if given."""
    address = to_checksum_address(contract_address)
    if not bytes(w3.eth.get_code(address)):
        raise AuditError(f"no contract code at {address}: wrong --contract or --rpc-url, or the chain was reset "
                         "(the writer re-anchors on restart)")
    topics: list[Any] = [contract.CHECKPOINT_TOPIC]
    if origin is not None:
        topics.append("0x" + contract.origin_hash(origin).hex())
    return list(scan_events(w3, address, topics, from_block, to_block, chunk, progress))


# -- verify / reconcile ------------------------------------------------------------------
@dataclass
class Finding:
    task_id: str | None
    kind: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "kind": self.kind, "detail": self.detail}


# Finding kinds that fail `verify` / `reconcile`.
FAILING = {
    "journal_digest_mismatch", "record_not_in_log", "record_missing", "record_unlogged", "log_rewritten",
    "checkpoint_signature_invalid", "checkpoint_mismatch", "checkpoint_inconsistent", "chain_checkpoint_mismatch",
    "anchored_checkpoint_unknown", "missing_on_chain", "pin_inconsistent", "log_key_changed",
    "witness_quorum_not_met", "envelope_digest_mismatch", "signature_invalid",
    "certificate_missing", "certificate_mismatch", "unanchored_required",
    "seq_duplicate",  # a reading stored by two coordinators (edge-audit fleet)
    "seq_gap",  # a reading missing from an agent's sequence (ledger/completeness.py)
}
# Of those, the ones that mean the signed history itself is not trustworthy (no pin moves then).
HISTORY_FAILURES = {"checkpoint_signature_invalid", "checkpoint_mismatch", "checkpoint_inconsistent",
                    "chain_checkpoint_mismatch", "anchored_checkpoint_unknown", "pin_inconsistent", "log_key_changed"}


@dataclass
class AuditReport:
    rows: int = 0
    on_chain: int = 0
    unanchored: int = 0
    erased: int = 0
    signatures_ok: int = 0
    signatures_not_checked: int = 0
    no_envelope: int = 0
    events: int = 0
    other_recorder_events: int = 0
    checkpoints: int = 0
    anchored_checkpoints: int = 0
    tree_size: int = 0
    origin: str = ""
    pinned: dict[str, Any] | None = None
    recorders: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    signature_note: str = ""
    witnessed: dict[str, Any] | None = None  # --witnesses K: {"quorum", "size", "reached": {who: size}}

    def witness_report(self, counted: Sequence[Any], reached: dict[str, int], quorum: int) -> None:
        """Record how far K witnesses cosigned; no checkpoint with K of them is a finding."""
        from ledger.witnesses import witnessed_size

        size = witnessed_size(reached, quorum)
        self.witnessed = {"quorum": quorum, "size": size, "witnesses": len(counted), "reached": dict(sorted(reached.items()))}
        if not size:
            seen = ", ".join(f"{w} up to size {n}" for w, n in sorted(reached.items())) or "none"
            self.add(None, "witness_quorum_not_met",
                     f"no checkpoint is cosigned by {quorum} witness(es) (cosigned: {seen}; {len(counted)} witness "
                     f"key(s) known): wait for more agents to cosign; if they do not, they may each have been shown "
                     f"a different log (split view)")

    @property
    def ok(self) -> bool:
        return not any(f.kind in FAILING for f in self.findings)

    def add(self, task_id: str | None, kind: str, detail: str) -> None:
        self.findings.append(Finding(task_id, kind, detail))

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "rows": self.rows, "on_chain": self.on_chain, "unanchored": self.unanchored,
            "erased": self.erased, "signatures_ok": self.signatures_ok,
            "signatures_not_checked": self.signatures_not_checked, "no_envelope": self.no_envelope,
            "events": self.events, "other_recorder_events": self.other_recorder_events,
            "checkpoints": self.checkpoints, "anchored_checkpoints": self.anchored_checkpoints,
            "tree_size": self.tree_size, "origin": self.origin, "pinned": self.pinned, "recorders": self.recorders,
            "signature_note": self.signature_note, "witnessed": self.witnessed,
            "findings": [f.as_dict() for f in self.findings],
        }


def known_recorders(journal: Journal, extra: Iterable[str] = ()) -> list[str]:
    config = journal.get_config()
    found = {to_checksum_address(a) for a in config.get("recorders", "").split(",") if a}
    if config.get("recorder"):
        found.add(to_checksum_address(config["recorder"]))
    found.update(to_checksum_address(a) for a in extra)
    return sorted(found)


@dataclass
class LogPolicy:
    """What the auditor requires of the log: its key, pins, witnesses."""

    log_verifier: Ed25519Verifier
    pins: PinStore | None = None
    witnesses: Sequence[CosignatureV1Verifier] = ()
    quorum: int = 0


def _signed_checkpoints(journal: Journal, policy: LogPolicy, report: AuditReport) -> dict[int, dict[str, Any]]:
    """Stored checkpoints whose note verifies under the log key, by size."""
    out: dict[int, dict[str, Any]] = {}
    for row in journal.checkpoints():
        report.checkpoints += 1
        try:
            cp, _ = open_checkpoint(row["note"], policy.log_verifier)
        except TlogError as exc:
            report.add(None, "checkpoint_signature_invalid", f"stored checkpoint of size {row['size']}: {exc}")
            continue
        if cp.size != row["size"] or cp.root_hash.hex() != row["root"]:
            report.add(None, "checkpoint_mismatch", f"checkpoint row of size {row['size']} differs from its signed note")
            continue
        out[cp.size] = {**row, "root_bytes": cp.root_hash}
    return out


def audit(
    journal: Journal,
    events: Sequence[CheckpointEvent],
    recorders: list[str],
    policy: LogPolicy,
    *,
    check_signatures: bool = True,
    verifier: SignatureVerifier | None = None,
    require_anchored: bool = False,
    list_unanchored: bool = False,
) -> AuditReport:
    """Verify the journal's records against the signed, anchored log; see FAILING for failures.

    Rows no anchored checkpoint covers yet are "unanchored" (a failure only if require_anchored).
    """
    if not recorders:
        raise AuditError("no known recorder address: the journal has no ledger config; pass --recorder ADDR")
    trusted = {to_checksum_address(a) for a in recorders}
    origin = policy.log_verifier.name
    report = AuditReport(recorders=sorted(trusted), origin=origin)
    if check_signatures and verifier is None:
        report.signature_note = "signatures not checked: security.envelope.verify_envelope_signature unavailable"
    elif not check_signatures:
        report.signature_note = "signatures not checked (--no-signatures)"
    tree = journal.merkle()
    report.tree_size = tree.size

    # 1. the signed history: signatures, mutual consistency, chain anchors, pin, witnesses
    signed = _signed_checkpoints(journal, policy, report)
    sizes = sorted(signed)
    for a, b in zip(sizes, sizes[1:], strict=False):
        try:
            verify_consistency(a, b, signed[a]["root_bytes"], signed[b]["root_bytes"], tree.consistency_proof(a, b))
        except TlogError as exc:
            report.add(None, "checkpoint_inconsistent", f"checkpoint {b} does not extend checkpoint {a}: {exc}")
    origin_key = contract.origin_hash(origin)
    anchored: dict[int, CheckpointEvent] = {}
    for event in events:
        if event.origin_key != origin_key:
            continue
        if event.recorder not in trusted:  # anyone may call the contract: only known recorders count
            report.other_recorder_events += 1
            report.add(None, "foreign_recorder", f"size {event.size} anchored for this log by unknown sender "
                                                 f"{event.recorder} in block {event.block_number} (ignored)")
            continue
        report.events += 1
        anchored.setdefault(event.size, event)
        if event.size not in signed:
            report.add(None, "anchored_checkpoint_unknown",
                       f"size {event.size} anchored in block {event.block_number} (tx {event.tx_hash[:18]}..) has no "
                       "signed checkpoint in the journal: the log's history was replaced")
        elif event.root != signed[event.size]["root_bytes"]:
            report.add(None, "chain_checkpoint_mismatch",
                       f"root anchored for size {event.size} in block {event.block_number} differs from the signed one")
    verified_anchored = [s for s in sizes if s in anchored and anchored[s].root == signed[s]["root_bytes"]]
    report.anchored_checkpoints = len(verified_anchored)
    for size in sizes:
        if signed[size]["anchor_state"] == CONFIRMED and size not in anchored:
            report.add(None, "missing_on_chain", f"journal says checkpoint {size} is anchored (block "
                                                 f"{signed[size]['block_number']}) but the chain has no event")
    latest = sizes[-1] if sizes else None
    if latest is not None:
        if latest > tree.size:
            report.add(None, "record_missing", f"checkpoint of size {latest} covers more leaves than the journal's "
                                               f"tree holds ({tree.size}): tree nodes were deleted")
        _check_pin_and_witnesses(journal, policy, report, signed[latest], tree)
    elif tree.size:  # not a failure by itself: its rows count as unanchored (--require-anchored fails them)
        report.add(None, "no_checkpoint", "the log has records but no signed checkpoint yet")
    if policy.quorum:  # (no checkpoint at all: nothing is witnessed either)
        _check_quorum(journal, policy, report, signed)

    # 2. every record: its leaf, rebuilt into a tree of our own, must give the signed roots
    leaves: dict[int, bytes] = {}
    rows_at: dict[int, str] = {}
    anchored_size = verified_anchored[-1] if verified_anchored else 0
    cur = journal.audit_tuples()  # AUDIT_COLUMNS: the record fields, digest, log_index, erased_at, envelope
    nfields = len(RECORD_FIELDS)
    for values in cur:  # tuples, not dicts: this loop is the audit's hot path
        report.rows += 1
        fields = dict(zip(RECORD_FIELDS, values, strict=False))
        digest, index, erased_at, envelope = values[nfields:]
        task_id = fields["task_id"]
        entry = canonical_json_of(fields)
        if hashlib.sha256(entry).hexdigest() != digest:
            report.add(task_id, "journal_digest_mismatch", "the row's fields no longer hash to its digest column: "
                                                           "row was altered")
        if index is None:
            report.add(task_id, "record_unlogged", "row has no log index: it was inserted behind the journal's back")
        else:
            leaves[index] = leaf_hash(entry)
            rows_at[index] = task_id
            if index < anchored_size:
                report.on_chain += 1
            else:
                report.unanchored += 1
                if require_anchored:
                    report.add(task_id, "unanchored_required", f"log index {index} is not covered by an anchored "
                                                               f"checkpoint yet (anchored size {anchored_size})")
                elif list_unanchored:
                    report.add(task_id, "unanchored", f"log index {index} not anchored yet (not a failure)")
        if erased_at is not None:
            report.erased += 1
        if envelope is None:
            report.no_envelope += 1
        else:
            _check_envelope(journal, {**fields, "envelope": envelope}, report, check_signatures, verifier)
    if latest is not None:
        _check_records_in_log(report, tree, signed, sizes, leaves, rows_at)
    return report


def _check_pin_and_witnesses(journal: Journal, policy: LogPolicy, report: AuditReport, newest: dict[str, Any],
                             tree: MerkleLog) -> None:
    vkey = policy.log_verifier.vkey
    if policy.pins is not None:
        for kind, detail in policy.pins.check(report.origin, vkey, newest["size"], newest["root_bytes"],
                                              tree.consistency_proof):
            report.add(None, kind, detail)
        pin = policy.pins.get(report.origin)
        report.pinned = {"size": pin.size} if pin else None

def _check_quorum(journal: Journal, policy: LogPolicy, report: AuditReport, signed: dict[int, dict[str, Any]]) -> None:
    """`--witnesses K`: K witnesses (named keys, or the agents' own keys bound by their signed
    cosign tasks) must have cosigned at least one checkpoint (ledger/witnesses.py)."""
    from ledger import witnesses as wit

    if policy.witnesses:
        counted = [wit.Witness(w.name, w) for w in policy.witnesses]
    else:
        verify, payload_of = wit.default_tools()
        counted, refused = wit.bound_witnesses(wit.journal_bindings(journal), verify, payload_of)
        for agent, why in refused:
            report.add(None, "witness_key_unbound", f"witness key of {agent!r} not counted: {why}")
    report.witness_report(counted, wit.reach(counted, _all_cosignatures(journal, policy, signed),
                                             {s: row["note"] for s, row in signed.items()}), policy.quorum)


def _all_cosignatures(journal: Journal, policy: LogPolicy, signed: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored cosignature lines (journal table) and any carried in the notes themselves."""
    rows = [{"size": c["size"], "line": c["line"]} for c in journal.all_cosignatures()]
    for size, row in signed.items():
        rows += [{"size": size, "line": sig.line()} for sig in split_note(row["note"])[1]
                 if sig.name != policy.log_verifier.name]
    return rows


def _check_records_in_log(report: AuditReport, tree: MerkleLog, signed: dict[int, dict[str, Any]],
                          sizes: list[int], leaves: dict[int, bytes], rows_at: dict[int, str]) -> None:
    """Rebuild the tree from the records' own leaves; every signed root must come out again."""
    top = max(sizes[-1], max(leaves, default=-1) + 1)
    gaps = [i for i in range(min(top, tree.size)) if i not in leaves]
    stored = dict(zip(gaps, tree.store.get_nodes([(0, i) for i in gaps]), strict=False)) if gaps else {}
    for i in gaps:
        report.add(None, "record_missing", f"log index {i} has no journal row: a record was deleted")
    mine = MerkleLog(MemoryNodeStore())
    mine.extend_leaf_hashes(leaves.get(i) or stored.get(i) or b"\0" * 32 for i in range(top))
    bad = [s for s in sizes if s <= top and mine.root(s) != signed[s]["root_bytes"]]
    if not bad:
        return
    first_bad = bad[0]
    # Name the records: compare each leaf with the tree the journal stored (whose roots the
    # checkpoints signed); if they agree, the stored tree itself was rebuilt.
    limit = min(sizes[-1], tree.size)
    named = 0
    indexes = sorted(i for i in leaves if i < limit)
    for start in range(0, len(indexes), 500):
        chunk = indexes[start:start + 500]
        for i, node in zip(chunk, tree.store.get_nodes([(0, i) for i in chunk]), strict=False):
            if node != leaves[i]:
                named += 1
                report.add(rows_at[i], "record_not_in_log",
                           f"record at log index {i} is not the leaf the signed checkpoints include: "
                           "it was edited, moved or replaced")
    if not named:
        report.add(None, "log_rewritten", f"the records do not rebuild the signed root of size {first_bad}, and the "
                                          "stored tree agrees with them: the tree was rebuilt after signing")


def _check_envelope(journal: Journal, row: dict[str, Any], report: AuditReport, check: bool,
                    verifier: SignatureVerifier | None) -> None:
    envelope = row.get("envelope")
    fingerprint = row.get("signer_fingerprint")
    pem = journal.certificate(fingerprint) if fingerprint and envelope is not None and check and verifier else None
    _check_envelope_bytes(None if envelope is None else bytes(envelope), row, pem, report, check, verifier)


def _check_envelope_bytes(envelope: bytes | None, row: dict[str, Any], pem: str | None, report: AuditReport,
                          check: bool, verifier: SignatureVerifier | None) -> None:
    """The stored envelope hashes to the record's envelope_digest and is signed by the signer's certificate."""
    task_id = row["task_id"]
    if envelope is None:
        report.no_envelope += 1  # never stored, or erased (the record still verifies: it holds digests only)
        return
    if row.get("envelope_digest") and hashlib.sha256(envelope).hexdigest() != row["envelope_digest"]:
        report.add(task_id, "envelope_digest_mismatch", "stored envelope does not hash to envelope_digest")
        return
    if not check or verifier is None:
        report.signatures_not_checked += 1
        return
    fingerprint = row.get("signer_fingerprint")
    if pem is None:
        report.add(task_id, "certificate_missing", f"no stored certificate for fingerprint {str(fingerprint)[:16]}..")
        return
    if certificate_fingerprint(pem) != fingerprint:
        report.add(task_id, "certificate_mismatch", "stored certificate does not hash to its fingerprint")
        return
    try:
        verifier(envelope, pem)
    except Exception as exc:  # noqa: BLE001 - any verifier failure is a failed signature
        report.add(task_id, "signature_invalid", f"{type(exc).__name__}: {exc}")
        return
    report.signatures_ok += 1


def reconcile(journal: Journal, events: Sequence[CheckpointEvent], recorders: list[str],
              policy: LogPolicy) -> AuditReport:
    """Log and chain vs journal only (no signatures): missing, mismatched, unanchored."""
    report = audit(journal, events, recorders, policy, check_signatures=False, list_unanchored=True)
    report.signature_note = ""  # reconcile never looks at signatures; `verify` does
    return report


def summarize(report: AuditReport, limit: int = 50) -> Iterator[str]:
    """Readable lines for the terminal."""
    yield (f"{report.rows} journal rows: {report.on_chain} in an anchored checkpoint, {report.unanchored} not "
           f"anchored yet, {report.erased} erased; log {report.origin} size {report.tree_size}")
    yield (f"checkpoints: {report.checkpoints} signed, {report.anchored_checkpoints} anchored; {report.events} "
           f"anchoring events read ({report.other_recorder_events} from other recorders)")
    if report.signature_note or report.signatures_ok or report.signatures_not_checked:
        yield (f"signatures: {report.signatures_ok} verified, {report.signatures_not_checked} not checked, "
               f"{report.no_envelope} rows without envelope")
    if report.signature_note:
        yield f"note: {report.signature_note}"
    counts: dict[str, int] = {}
    for f in report.findings:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    for f in report.findings[:limit]:
        yield f"  {f.kind:26} {f.task_id or '-':38} {f.detail}"
    if len(report.findings) > limit:
        yield f"  ... {len(report.findings) - limit} more findings (use --json for all)"
    if counts:
        yield "findings: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    yield "RESULT: OK" if report.ok else "RESULT: FAILED"


