"""Completeness: is every reading each agent took accounted for?

Why: the chain proves what the journal holds was not altered; it cannot show what never
arrived. Each agent numbers its readings 1, 2, 3, ... (`seq`), so the journal itself
shows every missing one: a gap. The agent's heartbeat adds what it knows and the
journal cannot: readings it dropped under its outbox bound (`dropped`, each one is
also a gap) and readings it still holds without a receipt (`unconfirmed`: on their
way, not lost). Read-only; used by `edge-audit verify|reconcile`, `edge-coordinator
agents` and the fleet page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger.journal import open_reader

GAP = "seq_gap"  # a failing audit finding
DROPPED = "readings_dropped"  # informational: the agent says so itself
UNCONFIRMED = "readings_unconfirmed"  # informational: still held by the agent


@dataclass
class AgentCompleteness:
    agent_id: str
    stored: int = 0  # readings in the journal
    last_seq: int = 0  # highest seq journaled
    gaps: list[tuple[int, int]] = field(default_factory=list)  # missing seqs below last_seq, as ranges
    dropped: int | None = None  # from the agent's last heartbeat (None: never reported)
    unconfirmed: int | None = None

    @property
    def missing(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.gaps)

    def as_dict(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "stored": self.stored, "last_seq": self.last_seq,
                "missing": self.missing, "gaps": [list(g) for g in self.gaps],
                "dropped": self.dropped, "unconfirmed": self.unconfirmed}


def check(journal_path: Path | str) -> dict[str, AgentCompleteness]:
    """Per agent: journaled readings, seq gaps, and what its heartbeat reported."""
    path = Path(journal_path)
    if not path.exists():
        return {}
    with open_reader(path, timeout=30) as reader:
        ranges = reader.reading_seq_ranges()
        reported = reader.agent_reports()
    out: dict[str, AgentCompleteness] = {}
    for agent in sorted(set(ranges) | set(reported)):
        islands = ranges.get(agent, [])
        gaps, expect = [], 1
        for lo, hi in islands:
            if lo > expect:
                gaps.append((expect, lo - 1))
            expect = hi + 1
        dropped, unconfirmed = reported.get(agent, (None, None))
        out[agent] = AgentCompleteness(
            agent_id=agent, stored=sum(hi - lo + 1 for lo, hi in islands), last_seq=islands[-1][1] if islands else 0,
            gaps=gaps, dropped=dropped, unconfirmed=unconfirmed)
    return out


def add_findings(report: Any, result: dict[str, AgentCompleteness]) -> None:
    """Add per-agent findings to an audit report (`report.add(task_id, kind, detail)`)."""
    for c in result.values():
        for lo, hi in c.gaps:
            what = f"seq {lo}" if lo == hi else f"seqs {lo}-{hi} ({hi - lo + 1})"
            report.add(None, GAP, f"{c.agent_id}: {what} missing from the journal")
        if c.dropped:
            report.add(None, DROPPED, f"{c.agent_id}: the agent reports {c.dropped} readings dropped (outbox bound)")
        if c.unconfirmed:
            report.add(None, UNCONFIRMED, f"{c.agent_id}: {c.unconfirmed} readings still held unconfirmed by the agent")
