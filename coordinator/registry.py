"""The agent registry: who is enrolled, when each agent was last heard from.

Why: `edge-coordinator agents` must answer "is sensor-7 alive, when does its
certificate expire, is its outbox backing up" from the coordinator's own database,
even while the daemon runs (the journal file is WAL, so readers do not block it).
Rows are written inside the ingest transaction, so the registry never claims a
reading the journal does not hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from ledger.sqlite_files import read_only

from .fleet_pki import RESERVED_NAMES, FleetStore

AGENTS = "agents"


def ensure_schema(db: sqlite_utils.Database) -> None:
    if AGENTS not in db.table_names():
        db[AGENTS].create(
            {
                "agent_id": str,
                "fingerprint": str,
                "cert_not_after": float,
                "first_seen": float,
                "last_seen": float,
                "last_task": str,
                "outbox_backlog": int,
                "interval": float,
                "version": str,
                "readings": int,
                "last_seq": int,
                "dropped": int,
                "unconfirmed": int,
                "witness_alarms": int,
                "takeovers": int,
                "takeover_last_at": float,
            },
            pk="agent_id",
        )
    else:
        columns = db[AGENTS].columns_dict
        for name, typ in (("dropped", int), ("unconfirmed", int),  # journals from before the heartbeat reported them
                          ("witness_alarms", int), ("takeovers", int), ("takeover_last_at", float)):
            if name not in columns:
                db[AGENTS].add_column(name, typ)


# One statement for "heard from": insert the agent or update it in place. Why SQL and not
# sqlite-utils' get + upsert: those read the table's schema on every call (~1 ms), and a
# batch from a fleet touches up to one row per reading (bench/fleet.py: ~8% of the
# coordinator's CPU at 1,000 agents).
_HEARD = (
    f"INSERT INTO {AGENTS} (agent_id, first_seen, last_seen, last_task, readings, last_seq, fingerprint, "
    "cert_not_after, outbox_backlog) VALUES (:agent_id, :now, :now, :task, :readings, :seq, :fingerprint, "
    ":cert_not_after, 0) ON CONFLICT (agent_id) DO UPDATE SET last_seen = excluded.last_seen, "
    "last_task = excluded.last_task, readings = COALESCE(readings, 0) + excluded.readings, "
    "last_seq = CASE WHEN excluded.last_seq IS NULL THEN last_seq "
    "ELSE MAX(COALESCE(last_seq, 0), excluded.last_seq) END, "
    "fingerprint = COALESCE(excluded.fingerprint, fingerprint), "
    "cert_not_after = COALESCE(excluded.cert_not_after, cert_not_after)"
)

#: heartbeat counts copied into the registry when the heartbeat carries them as integers
_HEARTBEAT_COUNTS = ("dropped", "unconfirmed", "witness_alarms")  # completeness; agent/witness.py


def _heard_row(agent_id: str, task: str, fingerprint: str | None, cert_not_after: float | None,
               readings: int, seq: int | None, now: float | None) -> dict[str, object]:
    return {"agent_id": agent_id, "now": time.time() if now is None else now, "task": task,
            "readings": int(readings), "seq": None if seq is None else int(seq),
            "fingerprint": fingerprint or None, "cert_not_after": cert_not_after or None}


def _heartbeat_columns(heartbeat: dict) -> dict[str, object]:
    """The registry columns a heartbeat sets (only those it carries, well typed)."""
    out: dict[str, object] = {"outbox_backlog": int(heartbeat.get("outbox_backlog") or 0)}
    for name in _HEARTBEAT_COUNTS:
        if isinstance(heartbeat.get(name), int):
            out[name] = int(heartbeat[name])
    if isinstance(heartbeat.get("takeovers"), int):  # another device with this id (agent/takeover.py)
        out["takeovers"] = int(heartbeat["takeovers"])
        out["takeover_last_at"] = float(heartbeat.get("takeover_last_at") or 0.0) or None
    if heartbeat.get("interval") is not None:
        out["interval"] = float(heartbeat["interval"])
    if heartbeat.get("version") is not None:
        out["version"] = str(heartbeat["version"])
    return out


def touch(
    db: sqlite_utils.Database,
    agent_id: str,
    *,
    task: str,
    fingerprint: str | None = None,
    cert_not_after: float | None = None,
    readings: int = 0,
    seq: int | None = None,
    heartbeat: dict | None = None,
    now: float | None = None,
) -> None:
    """Record that `agent_id` was heard from (inside the caller's transaction)."""
    db.conn.execute(_HEARD, _heard_row(agent_id, task, fingerprint, cert_not_after, readings, seq, now))
    if heartbeat:
        columns = _heartbeat_columns(heartbeat)
        db.conn.execute(f"UPDATE {AGENTS} SET {', '.join(f'{name} = ?' for name in columns)} WHERE agent_id = ?",
                        [*columns.values(), agent_id])


def touch_readings(db: sqlite_utils.Database, heard: list[tuple[str, int, int, dict]], now: float | None = None) -> None:
    """`touch` for a batch's readings, one row per agent: (agent_id, readings, highest seq,
    {task, fingerprint, cert_not_after}), in one executemany."""
    db.conn.executemany(_HEARD, [
        _heard_row(agent, common["task"], common.get("fingerprint"), common.get("cert_not_after"), count, top, now)
        for agent, count, top, common in heard])


@dataclass
class AgentView:
    agent_id: str
    status: str
    last_seen: float | None
    cert_not_after: float | None
    outbox_backlog: int | None
    readings: int
    version: str | None
    presented_not_after: float | None = None  # not-after of the certificate the agent last signed with
    gaps: int | None = None  # seqs missing from the journal (ledger/completeness.py)
    dropped: int | None = None  # readings the agent reports dropped at its outbox bound
    unconfirmed: int | None = None  # readings the agent still holds without a receipt
    witness_alarms: int | None = None  # inconsistent checkpoints / unprovable readings the agent saw, ever
    takeovers: int | None = None  # connections the agent lost to another device with its id (its heartbeat)
    takeover_last_at: float | None = None


def read_registry(journal_path: Path) -> dict[str, dict]:
    """Registry rows by agent id; empty when the daemon never ran."""
    if not journal_path.exists():
        return {}
    with read_only(journal_path) as conn:
        db = sqlite_utils.Database(conn)
        if AGENTS not in db.table_names():
            return {}
        return {row["agent_id"]: row for row in db[AGENTS].rows}


def list_agents(store: FleetStore, journal_path: Path, stale_after: float | None = None,
                now: float | None = None) -> list[AgentView]:
    """Enrolled agents (from issued certificates) merged with what the daemon saw.

    An agent is "online" when heard from within `stale_after` seconds (default: the
    configured heartbeat interval times missed_heartbeats, `monitor` in coordinator.toml),
    "expired" when its latest certificate is past its not-after (it can no longer sign).
    """
    now = time.time() if now is None else now
    stale_after = store.cfg.stale_after if stale_after is None else stale_after
    from ledger.completeness import check

    seen = read_registry(journal_path)
    complete = check(journal_path)
    reserved = {*store.cfg.coordinator_identities, *RESERVED_NAMES}
    names = [c.name for c in store.issued() if c.name not in reserved]
    names += [n for n in seen if n not in names]
    views: list[AgentView] = []
    for name in dict.fromkeys(names):
        row = seen.get(name, {})
        cert = store.latest(name)
        last = row.get("last_seen")
        not_after = cert.not_after if cert else row.get("cert_not_after")
        if store.is_revoked(name):
            status = "revoked"
        elif not_after is not None and not_after < now:
            status = "expired"
        elif last is None:
            status = "never-seen"
        elif now - last > stale_after:
            status = "stale"
        else:
            status = "online"
        views.append(
            AgentView(
                agent_id=name,
                status=status,
                last_seen=last,
                cert_not_after=not_after,
                outbox_backlog=row.get("outbox_backlog"),
                readings=int(row.get("readings") or 0),
                version=row.get("version"),
                presented_not_after=row.get("cert_not_after"),
                gaps=complete[name].missing if name in complete else None,
                dropped=row.get("dropped"),
                unconfirmed=row.get("unconfirmed"),
                witness_alarms=row.get("witness_alarms"),
                takeovers=row.get("takeovers"),
                takeover_last_at=row.get("takeover_last_at"),
            )
        )
    return views
