"""`edge-coordinator erase --agent X [--before T]`: right to erasure without breaking the log.

What goes: the raw readings and command results of the agent (before T), the signed
envelopes that carried them, and each record's args-digest salt. What stays: the
execution records themselves, which hold only digests: they are the log's leaves, so
every inclusion proof, checkpoint and audit keeps verifying, and `edge-audit` shows
those records as erased. Because each args digest is SHA-256(salt || payload) with a
random per-record salt, and the salt is deleted here, nobody can recover an erased
value by hashing candidate readings; the envelope digest covers an ECDSA signature, so
it cannot be brute-forced either. SQLite's secure_delete overwrites the freed pages and
the WAL is truncated, so the bytes do not linger in the file.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from .errors import CoordinatorError


def _when(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither unix seconds nor ISO 8601 (2026-11-26T10:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def add_parser(sub: argparse._SubParsersAction, common) -> None:
    p = sub.add_parser("erase", help="erase an agent's raw readings and envelopes; the log and audits keep verifying")
    common(p)
    p.add_argument("--agent", required=True, help="agent id whose data to erase")
    p.add_argument("--before", type=_when, help="only data received before this time (unix seconds or ISO 8601, UTC)")


def erase(journal_path: Path, agent: str, before: float | None) -> dict[str, int]:
    """Erase in one transaction; returns counts of what went."""
    from ledger.journal import Journal

    from .ingest import ensure_schema, erase_payloads

    journal = Journal(journal_path)
    try:
        with journal.secure_delete(), journal.transaction() as db:
            ensure_schema(db)
            readings, results = erase_payloads(db, agent, before)
            records = journal.erase_records(db, agent, before)
        return {"records": len(records), "readings": readings, "command_results": results}
    finally:
        journal.close()


def cmd_erase(args: argparse.Namespace, cfg) -> int:
    if not cfg.journal_path.exists():
        raise CoordinatorError(f"no journal at {cfg.journal_path}: check --data-dir")
    counts = erase(cfg.journal_path, args.agent, args.before)
    print(f"erased {args.agent}: {counts['readings']} readings, {counts['command_results']} command results, "
          f"envelopes and salts of {counts['records']} records; the records stay in the log (digests only)")
    return 0
