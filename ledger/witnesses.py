"""Witness quorum for audits: which agents cosigned how far into the log.

Why "how far" and not "this checkpoint": agents cosign the checkpoint their receipt
carried, so two agents rarely cosign the same one. A witness that cosigned size M
verified, before cosigning, that M extends everything it accepted earlier; when the
auditor has verified that checkpoint N is consistent with M (the audit checks every
stored checkpoint against every other), N is a prefix of what the witness saw. So a
witness counts for every checkpoint up to the largest one it validly cosigned, and the
log is witnessed by K up to the K-th largest of those sizes.

Whose keys count: the `--witness-key`s the auditor names, or (none named) the agents'
own: each agent's witness key arrives in its `edge.witness.cosign` task, whose signed
envelope (kept in the journal, or in the bundle) ties the key to the agent's fleet
certificate. A key whose envelope does not verify, or names another agent, is not
counted (`witness_key_unbound`).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from ledger.tlog.cosignature import CosignatureV1Verifier
from ledger.tlog.errors import TlogError
from ledger.tlog.note import open_note

COSIGN_TASK = "edge.witness.cosign"  # security.contract.WITNESS_COSIGN_TASK (ledger does not import security)


@dataclass(frozen=True)
class Witness:
    """A witness key the auditor counts, and whose it is (the agent id, or the key name)."""

    who: str
    verifier: CosignatureV1Verifier


def append_line(note: str, line: str) -> str:
    return note + (line if line.endswith("\n") else line + "\n")


def cosigns(note: str, line: str, witness: CosignatureV1Verifier) -> bool:
    """Whether `line` is `witness`'s valid cosignature of the checkpoint `note`."""
    try:
        opened = open_note(append_line(note, line), [witness])
    except TlogError:
        return False
    return opened.signed_by(witness.name, witness.key_id)


def reach(witnesses: Sequence[Witness], cosignatures: Iterable[Mapping[str, Any]],
          notes: Mapping[int, str]) -> dict[str, int]:
    """who -> the largest checkpoint size it validly cosigned (among `notes`, the verified ones).

    `cosignatures`: {"size", "line"} rows (the journal's tlog_cosignature, or a bundle's)."""
    by_key = {(w.verifier.name, w.verifier.key_id): w for w in witnesses}
    best: dict[str, int] = {}
    for row in sorted(cosignatures, key=lambda r: -int(r["size"])):
        size, line = int(row["size"]), str(row["line"])
        note = notes.get(size)
        if note is None:
            continue
        for witness in by_key.values():
            if best.get(witness.who, -1) >= size:
                continue
            if cosigns(note, line, witness.verifier):
                best[witness.who] = size
    return best


def witnessed_size(reached: Mapping[str, int], quorum: int) -> int:
    """The largest size at least `quorum` witnesses reached (0: none)."""
    sizes = sorted(reached.values(), reverse=True)
    return sizes[quorum - 1] if quorum and len(sizes) >= quorum else 0


def bound_witnesses(bindings: Iterable[Mapping[str, Any]], verify: Callable[[bytes, str], None] | None,
                    payload_of: Callable[[bytes], dict] | None) -> tuple[list[Witness], list[tuple[str, str]]]:
    """Agents' witness keys whose binding evidence holds: {"agent_id", "vkey", "envelope" (bytes),
    "certificate" (PEM)} -> (witnesses, [(agent, why not counted)])."""
    found: list[Witness] = []
    refused: list[tuple[str, str]] = []
    for b in bindings:
        agent, vkey = str(b["agent_id"]), str(b["vkey"])
        why = _binding_problem(agent, vkey, b.get("envelope"), b.get("certificate"), verify, payload_of)
        if why:
            refused.append((agent, why))
            continue
        found.append(Witness(agent, CosignatureV1Verifier.from_vkey(vkey)))
    return found, refused


def _binding_problem(agent: str, vkey: str, envelope: bytes | None, pem: str | None,
                     verify: Callable[[bytes, str], None] | None, payload_of: Callable[[bytes], dict] | None) -> str:
    if verify is None or payload_of is None:
        return "envelope signatures cannot be checked here (security package missing): name --witness-key"
    if envelope is None or pem is None:
        return "the cosign task's envelope or certificate is not kept (erased?)"
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names or names[0].value != agent:
            return "the envelope is signed by another certificate than the agent's"
        verify(envelope, pem)
        body = payload_of(envelope).get("body")
        cosignature = body[1].get("cosignature") if isinstance(body, list) and len(body) > 1 else None
        if not isinstance(cosignature, dict) or cosignature.get("witness_key") != vkey:
            return "the signed cosign task names another witness key"
        CosignatureV1Verifier.from_vkey(vkey)
    except Exception as exc:  # noqa: BLE001 - any failure means: not bound, not counted
        return f"{type(exc).__name__}: {exc}"
    return ""


def journal_bindings(journal: Any) -> list[dict[str, Any]]:
    """Binding evidence of every witness key in a journal (ledger.journal.Journal)."""
    out = []
    for key in journal.witness_keys():
        row = journal.get(key["task_id"]) or {}
        ok = row.get("task_name") == COSIGN_TASK and row.get("agent_id") == key["agent_id"]
        envelope = row.get("envelope") if ok else None
        pem = journal.certificate(row["signer_fingerprint"]) if ok and row.get("signer_fingerprint") else None
        out.append({**key, "envelope": bytes(envelope) if envelope is not None else None, "certificate": pem})
    return out


def bundle_bindings(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The same from a bundle's "witnesses" list (envelope base64)."""
    return [{**item, "envelope": base64.b64decode(item["envelope"]) if item.get("envelope") else None}
            for item in items]


def default_tools() -> tuple[Callable[[bytes, str], None] | None, Callable[[bytes], dict] | None]:
    try:
        from security.envelope import signed_payload, verify_envelope_signature
    except ImportError:
        return None, None
    return verify_envelope_signature, signed_payload
