"""Audit queries behind `edge-audit`: list, show, verify, reconcile, export.

Why verify reads the chain itself: an auditor must not trust the coordinator's view of
anchoring. Each journal row's digest is recomputed from its fields and compared with
the ExecutionRecorded event for that taskId, read with chunked `eth_getLogs` from every
sender; events from senders other than the journal's known recorders are forgeries
as far as this journal is concerned. Signed envelopes are re-verified with the stored
signer certificate through a `SignatureVerifier` (security.envelope when available).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from eth_utils import to_checksum_address
from web3 import Web3

from ledger import contract
from ledger.contract import ChainEvent
from ledger.journal import PENDING, SENT, Journal, certificate_fingerprint
from ledger.record import ExecutionRecord
from ledger.rpc import LOG_CHUNK, scan_events

EXPORT_FIELDS = (
    "task_id", "task_name", "agent_id", "status", "received_at", "started_at", "finished_at",
    "signer_fingerprint", "args_digest", "result_digest", "envelope_digest", "digest",
    "anchor_state", "tx_hash", "block_number", "block_hash", "chain_id", "contract",
)


class SignatureVerifier(Protocol):
    """Raises on a bad signature; returns None when `envelope` was signed by the cert's key."""

    def __call__(self, envelope: bytes, certificate_pem: str) -> None: ...


def default_verifier() -> SignatureVerifier | None:
    """security.envelope.verify_envelope_signature if installed, else None ("not checked")."""
    try:
        from security.envelope import verify_envelope_signature
    except ImportError:
        return None
    return verify_envelope_signature


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

    def sql(self) -> tuple[str, list[Any]]:
        where, params = ["1=1"], []
        for column, value in (("agent_id", self.agent), ("task_name", self.task_name),
                              ("anchor_state", self.anchor_state)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if self.status is not None:  # SUCCESS, success and Success name the same status
            where.append("UPPER(status) = UPPER(?)")
            params.append(self.status)
        if self.since is not None:
            where.append("received_at >= ?")
            params.append(self.since)
        if self.until is not None:
            where.append("received_at < ?")
            params.append(self.until)
        return " AND ".join(where), params


def list_records(journal: Journal, filters: Filters = Filters()) -> list[dict[str, Any]]:
    where, params = filters.sql()
    return [_public(r) for r in journal.rows(where, params, limit=filters.limit)]


def _public(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in EXPORT_FIELDS}
    out["has_envelope"] = row.get("envelope") is not None
    return out


def show(journal: Journal, task_id: str) -> dict[str, Any] | None:
    row = journal.get(task_id)
    if row is None:
        return None
    out = _public(row)
    record = ExecutionRecord.from_mapping(row)
    out["canonical_json"] = record.canonical_json().decode()
    out["recomputed_digest"] = record.digest().hex()
    out["task_key"] = "0x" + record.task_key.hex()
    out["agent_key"] = "0x" + record.agent_key.hex()
    out["certificate_stored"] = bool(row.get("signer_fingerprint")) and journal.certificate(row["signer_fingerprint"]) is not None
    return out


def export(journal: Journal, out: IO[str], fmt: str = "jsonl", filters: Filters = Filters()) -> int:
    """Write rows (without envelope bytes) as JSONL or CSV; returns the row count."""
    rows = list_records(journal, filters)
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=[*EXPORT_FIELDS, "has_envelope"])
        writer.writeheader()
        writer.writerows(rows)
    else:
        raise AuditError(f"unknown export format {fmt!r}: use jsonl or csv")
    return len(rows)


# -- chain events ----------------------------------------------------------------------
def fetch_events(w3: Web3, contract_address: str, from_block: int = 0, to_block: int | None = None,
                 chunk: int = LOG_CHUNK, progress: Callable[[int, int], None] | None = None,
                 ) -> dict[bytes, list[ChainEvent]]:
    """All ExecutionRecorded events of the contract (any sender), grouped by taskId key."""
    address = to_checksum_address(contract_address)
    if not bytes(w3.eth.get_code(address)):
        raise AuditError(f"no contract code at {address}: wrong --contract or --rpc-url, or the chain was reset "
                         "(the writer re-anchors on restart)")
    events: dict[bytes, list[ChainEvent]] = {}
    for event in scan_events(w3, address, [contract.EVENT_TOPIC], from_block, to_block, chunk, progress):
        events.setdefault(event.task_key, []).append(event)
    return events


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
    "journal_digest_mismatch", "chain_digest_mismatch", "chain_field_mismatch", "missing_on_chain",
    "duplicate_on_chain", "foreign_recorder", "missing_from_journal", "envelope_digest_mismatch",
    "signature_invalid", "certificate_missing", "certificate_mismatch", "unanchored_required",
    "seq_gap",  # a reading missing from an agent's sequence (ledger/completeness.py)
}


@dataclass
class AuditReport:
    rows: int = 0
    on_chain: int = 0
    unanchored: int = 0
    signatures_ok: int = 0
    signatures_not_checked: int = 0
    no_envelope: int = 0
    events: int = 0
    other_recorder_events: int = 0
    recorders: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    signature_note: str = ""

    @property
    def ok(self) -> bool:
        return not any(f.kind in FAILING for f in self.findings)

    def add(self, task_id: str | None, kind: str, detail: str) -> None:
        self.findings.append(Finding(task_id, kind, detail))

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "rows": self.rows, "on_chain": self.on_chain, "unanchored": self.unanchored,
            "signatures_ok": self.signatures_ok, "signatures_not_checked": self.signatures_not_checked,
            "no_envelope": self.no_envelope, "events": self.events,
            "other_recorder_events": self.other_recorder_events, "recorders": self.recorders,
            "signature_note": self.signature_note, "findings": [f.as_dict() for f in self.findings],
        }


def known_recorders(journal: Journal, extra: Iterable[str] = ()) -> list[str]:
    config = journal.get_config()
    found = {to_checksum_address(a) for a in config.get("recorders", "").split(",") if a}
    if config.get("recorder"):
        found.add(to_checksum_address(config["recorder"]))
    found.update(to_checksum_address(a) for a in extra)
    return sorted(found)


def audit(
    journal: Journal,
    events: dict[bytes, list[ChainEvent]],
    recorders: list[str],
    *,
    check_signatures: bool = True,
    verifier: SignatureVerifier | None = None,
    require_anchored: bool = False,
    list_unanchored: bool = False,
) -> AuditReport:
    """Compare every journal row with the chain (and its envelope); see FAILING for failures.

    Pending/sent rows with no event are "unanchored" (a failure only if require_anchored).
    """
    if not recorders:
        raise AuditError("no known recorder address: the journal has no ledger config; pass --recorder ADDR")
    trusted = {to_checksum_address(a) for a in recorders}
    report = AuditReport(recorders=sorted(trusted), events=sum(len(v) for v in events.values()))
    if check_signatures and verifier is None:
        report.signature_note = "signatures not checked: security.envelope.verify_envelope_signature unavailable"
    elif not check_signatures:
        report.signature_note = "signatures not checked (--no-signatures)"
    seen: set[bytes] = set()
    for row in journal.rows():
        report.rows += 1
        task_id = row["task_id"]
        record = ExecutionRecord.from_mapping(row)
        digest = record.digest()
        if digest.hex() != row["digest"]:
            report.add(task_id, "journal_digest_mismatch",
                       f"fields hash to {digest.hex()[:16]}.. but the row says {str(row['digest'])[:16]}..: row was altered")
        key = record.task_key
        seen.add(key)
        mine = [e for e in events.get(key, []) if e.recorder in trusted]
        foreign = [e for e in events.get(key, []) if e.recorder not in trusted]
        for event in foreign:
            report.add(task_id, "foreign_recorder",
                       f"event in block {event.block_number} (tx {event.tx_hash[:18]}..) from unknown sender {event.recorder}")
        if not mine:
            if row["anchor_state"] in (PENDING, SENT):
                report.unanchored += 1
                if require_anchored:
                    report.add(task_id, "unanchored_required", f"row is {row['anchor_state']}, not on chain yet")
                elif list_unanchored:
                    report.add(task_id, "unanchored", f"row is {row['anchor_state']}, not on chain yet (not a failure)")
            else:
                report.add(task_id, "missing_on_chain",
                           f"journal says {row['anchor_state']} (block {row['block_number']}) but the chain has no event")
        else:
            report.on_chain += 1
            if len(mine) > 1:
                report.add(task_id, "duplicate_on_chain", f"{len(mine)} events for one task")
            event = mine[0]
            if event.digest != digest:
                report.add(task_id, "chain_digest_mismatch",
                           f"chain digest {event.digest.hex()[:16]}.. != recomputed {digest.hex()[:16]}..")
            elif (event.agent_key, event.status, event.finished_ms) != (record.agent_key, record.status_code,
                                                                        record.finished_at_ms):
                report.add(task_id, "chain_field_mismatch", "agentId/status/timestamp on chain differ from the journal")
        _check_envelope(journal, row, report, check_signatures, verifier)
    for key, evs in events.items():
        if key in seen:
            continue
        for event in evs:
            if event.recorder in trusted:
                report.add(None, "missing_from_journal",
                           f"task key 0x{key.hex()[:16]}.. recorded by {event.recorder} in block "
                           f"{event.block_number} has no journal row (row deleted?)")
            else:
                report.other_recorder_events += 1
    return report


def _check_envelope(journal: Journal, row: dict[str, Any], report: AuditReport, check: bool,
                    verifier: SignatureVerifier | None) -> None:
    envelope = row.get("envelope")
    task_id = row["task_id"]
    if envelope is None:
        report.no_envelope += 1
        return
    envelope = bytes(envelope)
    if row.get("envelope_digest") and hashlib.sha256(envelope).hexdigest() != row["envelope_digest"]:
        report.add(task_id, "envelope_digest_mismatch", "stored envelope does not hash to envelope_digest")
        return
    if not check or verifier is None:
        report.signatures_not_checked += 1
        return
    fingerprint = row.get("signer_fingerprint")
    pem = journal.certificate(fingerprint) if fingerprint else None
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


def reconcile(journal: Journal, events: dict[bytes, list[ChainEvent]], recorders: list[str]) -> AuditReport:
    """Chain vs journal only: missing on chain, mismatched, unanchored, unknown on chain."""
    report = audit(journal, events, recorders, check_signatures=False, list_unanchored=True)
    report.signature_note = ""  # reconcile never looks at signatures; `verify` does
    return report


def summarize(report: AuditReport, limit: int = 50) -> Iterator[str]:
    """Readable lines for the terminal."""
    yield (f"{report.rows} journal rows: {report.on_chain} on chain, {report.unanchored} not anchored yet; "
           f"{report.events} events read ({report.other_recorder_events} from other recorders)")
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


