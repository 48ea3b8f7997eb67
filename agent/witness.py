"""The agent as a witness of the coordinator's transparency log (issue #12).

Why: the coordinator's operator holds the log key and the journal, so it can re-sign a
rewritten history. What it cannot take back is a checkpoint a device already verified
and cosigned. Each receipt (coordinator/receipts.py) carries the newest signed
checkpoint, a consistency proof from the checkpoint this agent accepted last, and
inclusion proofs of the agent's own confirmed readings. This module checks them and
keeps what it accepted; it never deletes anything itself.

- Log key: `<data dir>/log.pub` (copied from the enrollment bundle by `edge-agent
  enroll`), or, when absent, the receipt's `log_key` pinned on first use into that file.
  Afterwards a different key is an alarm (fail closed).
- First checkpoint: accepted on trust-on-first-use (nothing to be consistent with).
- Later checkpoints: same size needs the same root; a larger one needs a consistency
  proof FROM the accepted size; a smaller one is an alarm.
- Readings: the leaf is rebuilt from what the agent knows itself (its reading, its id,
  the contract task id, status SUCCESS) plus the coordinator's salt and times, so a
  verified proof shows the log holds THIS reading, not just some leaf.
- Accepted checkpoints are cosigned (C2SP tlog-cosignature/v1) with the agent's own
  Ed25519 witness key `<data dir>/witness.key`, named `witness/<agent id>`; the
  `edge.witness.cosign` task carrying it is signed under the agent's fleet certificate,
  which ties the witness key to the enrolled agent.

- Unproven readings: a reading the receipts keep confirming but never prove (a coordinator
  that says "stored" but never logged it, or withholds its proof) is tracked in the
  `witness_unproven` table from its first confirmation. Receipts prove the lowest confirmed
  seqs first, at most RECEIPT_MAX_PROOFS each; one with fewer proofs and a checkpoint LARGER
  than the one that came with the first confirmation (so taken after the reading was
  journaled) should have proven it: that is a miss. After UNPROVEN_MISSES misses AND
  `witness_proof_timeout` seconds since the first miss, one `reading_unproven` alarm
  is raised for the reading (once); the receipt itself is not refused (its proven readings
  leave), and the unproven reading stays in the outbox and keeps being re-sent.

Alarms: an ERROR log line (what happened, what to do), a row in the outbox's
`witness_alarm` table with the evidence (both checkpoints, the proof), a JSON copy under
`<data dir>/witness-evidence/`, and a count in the heartbeat and `edge-agent status`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger.record import ExecutionRecord
from ledger.tlog.checkpoint import Checkpoint, open_checkpoint
from ledger.tlog.cosignature import CosignatureV1Signer
from ledger.tlog.errors import TlogError
from ledger.tlog.merkle import leaf_hash, verify_consistency, verify_inclusion
from ledger.tlog.note import Ed25519Verifier, split_note
from security.contract import INGEST_TASK, RECEIPT_MAX_PROOFS, reading_task_id, witness_key_name

log = logging.getLogger("edge.agent.witness")

LOG_PUB = "log.pub"
WITNESS_KEY = "witness.key"
EVIDENCE_DIR = "witness-evidence"
ACCEPTED_META = "witness_checkpoint"  # outbox meta: the signed note this agent accepted last
ALARMS_META = "witness_alarms"  # outbox meta: how many alarms, ever
UNPROVEN_MISSES = 3  # receipts that should have proven a reading but did not, before its alarm
SEEN_KEPT = 16  # receipts kept as evidence per unproven reading (the first ones and the newest)

SCHEMA = """
CREATE TABLE IF NOT EXISTS witness_alarm (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    accepted TEXT,
    presented TEXT,
    evidence TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS witness_unproven (
    seq INTEGER PRIMARY KEY,
    first_at REAL NOT NULL,
    first_size INTEGER NOT NULL,
    first_upto INTEGER NOT NULL,
    first_held TEXT NOT NULL,
    misses INTEGER NOT NULL DEFAULT 0,
    first_miss_at REAL,
    seen TEXT NOT NULL DEFAULT '[]',
    alarmed_at REAL
);
"""

FIX = ("keep this agent's data dir (it is the evidence), do not re-enroll or wipe it, and have an auditor compare "
       "the coordinator's journal with it (`edge-agent status --json` shows the alarm; the files are in {dir})")


class WitnessAlarm(Exception):
    """The coordinator presented a log this agent cannot accept; the receipt is refused."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class Verdict:
    """What a receipt's checkpoint part proved: seqs whose inclusion verified, and the
    cosignature to send (None when nothing new was accepted)."""

    proven: set[int] = field(default_factory=set)
    cosignature: dict[str, Any] | None = None
    accepted_size: int | None = None


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"{what} is not base64: {exc}") from None


def digest_of(value: Any, salt: bytes = b"") -> str:
    """SHA-256 hex of `salt || canonical JSON`: how the coordinator digests a task's arguments."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    return hashlib.sha256(salt + data).hexdigest()


def reading_leaf(agent_id: str, reading: Mapping[str, Any], proof: Mapping[str, Any]) -> bytes:
    """The RFC 6962 leaf hash of the journal record of `reading`, rebuilt from the agent's own
    knowledge plus the coordinator's salt, times and digests of things the agent never saw."""
    record = ExecutionRecord(
        task_id=reading_task_id(agent_id, int(reading["seq"])),
        task_name=INGEST_TASK,
        agent_id=agent_id,
        signer_fingerprint=proof.get("signer_fingerprint"),
        args_digest=digest_of(dict(reading), _b64(proof.get("salt"), "salt")),
        result_digest=proof.get("result_digest"),
        status="SUCCESS",
        received_at=proof["received_at"],
        started_at=proof.get("started_at"),
        finished_at=proof.get("finished_at"),
        envelope_digest=proof.get("envelope_digest"),
    )
    return leaf_hash(record.canonical_json())


def _checkpoint_of(note: str) -> Checkpoint:
    return Checkpoint.parse(split_note(note)[0])


class Witness:
    """Checks receipts' checkpoints for one agent; state lives in its outbox database."""

    def __init__(self, data_dir: Path, agent_id: str, db: sqlite3.Connection,
                 clock: Callable[[], float] = time.time, proof_timeout: float = 300.0) -> None:
        self.data_dir = Path(data_dir)
        self.agent_id = agent_id
        self.db = db
        self.clock = clock
        self.proof_timeout = proof_timeout
        db.executescript(SCHEMA)

    # -- state ------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def accepted(self) -> str | None:
        """The signed checkpoint note this agent accepted (and cosigned) last."""
        return self._meta(ACCEPTED_META)

    @property
    def log_pub(self) -> Path:
        return self.data_dir / LOG_PUB

    def pinned_key(self) -> str | None:
        return self.log_pub.read_text().strip() if self.log_pub.exists() else None

    def signer(self) -> CosignatureV1Signer:
        """The agent's witness key (created 0600 on first use; it never leaves the device)."""
        path = self.data_dir / WITNESS_KEY
        if path.exists():
            signer = CosignatureV1Signer.from_skey(path.read_text().strip(), self.clock)
            if signer.name != witness_key_name(self.agent_id):
                raise WitnessAlarm("witness_key_mismatch", f"{path} belongs to {signer.name!r}, not this agent: "
                                                           f"move it away (a new key is made on the next receipt)")
            return signer
        signer = CosignatureV1Signer.generate(witness_key_name(self.agent_id), self.clock)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(signer.skey + "\n")
        log.info("witness key %s created: %s", path, signer.verifier().vkey)
        return signer

    def status(self) -> dict[str, Any]:
        accepted = self.accepted()
        size = _checkpoint_of(accepted).size if accepted else None
        last = self.db.execute("SELECT at, kind, detail FROM witness_alarm ORDER BY id DESC LIMIT 1").fetchone()
        return {"log_key": self.pinned_key(), "accepted_size": size, "alarms": int(self._meta(ALARMS_META) or 0),
                "last_alarm": {"at": last[0], "kind": last[1], "detail": last[2]} if last else None}

    # -- checking ---------------------------------------------------------------------
    def check(self, part: Any, readings: Mapping[int, Mapping[str, Any]]) -> Verdict | None:
        """Verify a receipt's `checkpoint` part against what this agent accepted before.

        Returns None when no log is witnessed yet (no pinned key and no checkpoint: the
        receipt is trusted as before), a Verdict otherwise; raises WitnessAlarm (after
        recording the evidence) when the log is inconsistent or a reading unprovable.
        """
        pinned = self.pinned_key()
        if part is None:
            if pinned is not None:
                log.warning("receipt without a log checkpoint: confirmed readings are kept until one proves them")
                return Verdict()
            return None
        if not isinstance(part, dict) or not isinstance(part.get("note"), str):
            raise self._alarm("malformed_checkpoint", "the receipt's checkpoint part is not {note, ...}", None, None,
                              {"part": part})
        note = part["note"]
        offered = part.get("log_key")
        if pinned is None:
            if not isinstance(offered, str):
                raise self._alarm("no_log_key", "no log key pinned and the receipt names none", None, note, {})
            try:
                Ed25519Verifier.from_vkey(offered.strip())
            except TlogError as exc:
                raise self._alarm("no_log_key", f"the receipt's log key does not parse: {exc}", None, note, {}) from None
            self.log_pub.write_text(offered.strip() + "\n")
            pinned = offered.strip()
            log.warning("log key %s pinned on first use in %s", pinned, self.log_pub)
        elif isinstance(offered, str) and offered.strip() != pinned:
            raise self._alarm("log_key_changed", f"the coordinator now names log key {offered.strip()!r}, this agent "
                                                 f"pinned {pinned!r}", self.accepted(), note, {"offered": offered})
        try:
            new, _ = open_checkpoint(note, Ed25519Verifier.from_vkey(pinned))
        except TlogError as exc:
            raise self._alarm("checkpoint_signature_invalid", f"checkpoint does not verify under the pinned log key: "
                                                              f"{exc}", self.accepted(), note, {}) from None
        old_note = self.accepted()
        fresh = True
        if old_note is not None:
            old = _checkpoint_of(old_note)
            if new.size < old.size:
                raise self._alarm("checkpoint_shrunk", f"checkpoint of size {new.size} is smaller than the accepted "
                                                       f"size {old.size}: the log lost records", old_note, note, {})
            if new.size == old.size:
                if new.root_hash != old.root_hash:
                    raise self._alarm("checkpoint_fork", f"two different roots for size {new.size}: the log was "
                                                         f"rewritten or forked", old_note, note, {})
                fresh = False
            else:
                consistency = part.get("consistency")
                if not isinstance(consistency, dict) or consistency.get("from") != old.size:
                    # The coordinator does not know our newest cosignature (lost, or still on its way):
                    # send it (again, same task id) so the next receipt proves from the accepted size.
                    log.warning("receipt's checkpoint (size %d) has no consistency proof from the accepted size %d: "
                                "not accepted; re-sending the cosignature of %d, confirmed readings are kept until "
                                "a receipt proves them", new.size, old.size, old.size)
                    return Verdict(cosignature=self._cosignature(old))
                try:
                    hashes = [_b64(h, "consistency hash") for h in consistency.get("proof") or []]
                    verify_consistency(old.size, new.size, old.root_hash, new.root_hash, hashes)
                except (TlogError, ValueError) as exc:
                    raise self._alarm("checkpoint_inconsistent", f"size {new.size} does not extend the accepted size "
                                                                 f"{old.size}: {exc}", old_note, note,
                                      {"consistency": consistency}) from None
        proven = self._check_readings(part.get("proofs") or [], readings, new, old_note, note)
        verdict = Verdict(proven=proven, accepted_size=new.size)
        if fresh:
            verdict.cosignature = self._cosignature(new)
            self._set_meta(ACCEPTED_META, note)
        return verdict

    def _cosignature(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """The edge.witness.cosign payload for `checkpoint` (tlog-cosignature/v1 line + witness vkey)."""
        signer = self.signer()
        return {"agent_id": self.agent_id, "size": checkpoint.size, "witness_key": signer.verifier().vkey,
                "cosignature": signer.cosign(checkpoint).line(), "sent_at": self.clock()}

    def _check_readings(self, proofs: Any, readings: Mapping[int, Mapping[str, Any]], cp: Checkpoint,
                        old_note: str | None, note: str) -> set[int]:
        if not isinstance(proofs, list):
            raise self._alarm("malformed_checkpoint", "the receipt's proofs are not a list", old_note, note, {})
        proven: set[int] = set()
        for proof in proofs:
            seq = proof.get("seq") if isinstance(proof, dict) else None
            reading = readings.get(seq) if isinstance(seq, int) else None
            if reading is None:
                continue  # confirmed and deleted before (or never ours to check): nothing to prove
            try:
                index = proof["index"]
                if not isinstance(index, int) or isinstance(index, bool):
                    raise ValueError("index is not an integer")
                path = [_b64(h, "inclusion hash") for h in proof.get("path") or []]
                verify_inclusion(reading_leaf(self.agent_id, reading, proof), index, cp.size, path, cp.root_hash)
            except (TlogError, ValueError, KeyError, TypeError) as exc:
                raise self._alarm("reading_not_in_log", f"reading seq {seq} is confirmed but its record is not "
                                                        f"provably in the checkpoint of size {cp.size}: {exc}",
                                  old_note, note, {"proof": proof, "reading": dict(reading)}) from None
            proven.add(seq)
        return proven

    def track_unproven(self, confirmed: list[int], part: Any, verdict: Verdict, upto: int,
                       held: list[tuple[int, int]]) -> list[int]:
        """After a checked receipt: remember confirmed-but-unproven readings, count the receipts
        that should have proven them, and raise one `reading_unproven` alarm (not raised: the
        receipt's proven readings still leave) for those overdue. Returns the newly alarmed seqs."""
        if verdict.accepted_size is None or not isinstance(part, dict):
            return []  # nothing accepted from this receipt: it cannot tell whether a proof is missing
        size, now = verdict.accepted_size, self.clock()
        proofs = part.get("proofs")
        full = isinstance(proofs, list) and len(proofs) >= RECEIPT_MAX_PROOFS  # a backlog: the rest come next
        receipt = {"at": now, "size": size, "upto": upto, "held": [list(r) for r in held],
                   "proofs": len(proofs) if isinstance(proofs, list) else 0}
        due: list[dict[str, Any]] = []
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for seq in verdict.proven:
                self.db.execute("DELETE FROM witness_unproven WHERE seq = ?", (seq,))
            for seq in confirmed:
                if seq in verdict.proven:
                    continue
                row = self.db.execute("SELECT first_at, first_size, first_upto, first_held, misses, first_miss_at, seen, "
                                      "alarmed_at FROM witness_unproven WHERE seq = ?", (seq,)).fetchone()
                if row is None:
                    self.db.execute("INSERT INTO witness_unproven (seq, first_at, first_size, first_upto, first_held) "
                                    "VALUES (?, ?, ?, ?, ?)", (seq, now, size, upto, json.dumps(receipt["held"])))
                    continue
                first_at, first_size, first_upto, first_held, misses, first_miss_at, seen_json, alarmed_at = row
                if full or size <= first_size:
                    continue  # this checkpoint may predate the reading's record, or proofs were cut off
                seen = json.loads(seen_json)
                seen.append(receipt)
                if len(seen) > SEEN_KEPT:
                    del seen[SEEN_KEPT // 2]  # keep the first receipts and the newest ones
                misses += 1
                first_miss_at = now if first_miss_at is None else first_miss_at
                # timed from the first miss, not the first confirmation: a backlog's wait does not count,
                # and after a coordinator restart the reading is re-sent (and proven) within the bound
                overdue = alarmed_at is None and misses >= UNPROVEN_MISSES and now - first_miss_at >= self.proof_timeout
                self.db.execute("UPDATE witness_unproven SET misses = ?, first_miss_at = ?, seen = ?, alarmed_at = ? "
                                "WHERE seq = ?", (misses, first_miss_at, json.dumps(seen), now if overdue else alarmed_at,
                                                  seq))
                if overdue:
                    due.append({"seq": seq, "first_confirmed_at": first_at, "first_checkpoint_size": first_size,
                                "first_upto": first_upto, "first_held": json.loads(first_held), "misses": misses,
                                "first_miss_at": first_miss_at,
                                "receipts_since": seen})
        if due:
            seqs = [d["seq"] for d in due]
            oldest = min(d["first_confirmed_at"] for d in due)
            self._alarm("reading_unproven",
                        f"reading seq {', '.join(map(str, seqs))} confirmed by the coordinator since "
                        f"{now - oldest:.0f} s but never proven in its log, over {min(d['misses'] for d in due)}+ "
                        f"receipts whose checkpoint (now size {size}) must cover it: it was not logged, or its "
                        f"proof is withheld", self.accepted(), part.get("note"),
                        {"readings": due, "receipt": receipt}, refused=False)
        return [d["seq"] for d in due]

    def _alarm(self, kind: str, detail: str, accepted: str | None, presented: str | None,
               evidence: dict[str, Any], refused: bool = True) -> WitnessAlarm:
        """Record the evidence (table + file), count it, log an ERROR; the caller raises (when
        `refused`; a `reading_unproven` alarm is raised once per reading by its caller instead)."""
        now = self.clock()
        body = json.dumps(evidence, default=str, sort_keys=True)
        seen = self.db.execute("SELECT 1 FROM witness_alarm WHERE kind = ? AND presented IS ?",
                               (kind, presented)).fetchone() if refused else None
        if seen is not None:  # the same bad checkpoint again: refused again, counted and kept once
            log.error("WITNESS ALARM %s (again, evidence kept already): %s", kind, detail)
            return WitnessAlarm(kind, detail)
        self.db.execute("INSERT INTO witness_alarm (at, kind, detail, accepted, presented, evidence) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (now, kind, detail, accepted, presented, body))
        self.db.execute("INSERT INTO meta(key, value) VALUES (?, '1') "
                        "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1", (ALARMS_META,))
        folder = self.data_dir / EVIDENCE_DIR
        try:
            folder.mkdir(exist_ok=True)
            name = folder / f"{int(now * 1000)}-{kind}.json"
            name.write_text(json.dumps({"at": now, "kind": kind, "detail": detail, "accepted": accepted,
                                        "presented": presented, "evidence": evidence}, default=str, indent=2))
        except OSError as exc:  # the table row is the evidence of record; the file is a convenience
            log.warning("witness evidence file not written (%s); it is in the outbox's witness_alarm table", exc)
        log.error("WITNESS ALARM %s: %s. %s and the affected readings stay in the outbox (re-sent). What to do: %s",
                  kind, detail, "The receipt is refused" if refused else "They are never deleted without a proof",
                  FIX.format(dir=folder))
        return WitnessAlarm(kind, detail)


def read_status(db: sqlite3.Connection, data_dir: Path) -> dict[str, Any]:
    """`edge-agent status`: the witness state from the outbox file (no running agent needed)."""
    try:
        accepted = db.execute("SELECT value FROM meta WHERE key = ?", (ACCEPTED_META,)).fetchone()
        alarms = db.execute("SELECT value FROM meta WHERE key = ?", (ALARMS_META,)).fetchone()
        last = db.execute("SELECT at, kind, detail FROM witness_alarm ORDER BY id DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # an outbox from before witnessing: no table yet
        accepted, alarms, last = None, None, None
    log_pub = Path(data_dir) / LOG_PUB
    return {"log_key": log_pub.read_text().strip() if log_pub.exists() else None,
            "accepted_size": _checkpoint_of(accepted[0]).size if accepted else None,
            "alarms": int(alarms[0]) if alarms else 0,
            "last_alarm": {"at": last[0], "kind": last[1], "detail": last[2]} if last else None}
