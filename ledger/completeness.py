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

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ledger.journal import JournalReader, open_reader

GAP = "seq_gap"  # a failing audit finding
DUPLICATE = "seq_duplicate"  # failing: one reading stored by two coordinators (edge-audit fleet)
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


@dataclass
class Duplicate:
    """Seqs `lo`..`hi` of `agent_id` are stored in two journals (several coordinators)."""

    agent_id: str
    lo: int
    hi: int
    journals: tuple[str, str]
    #: True: both journals hold the same task ids (one signed reading stored twice, a re-send
    #: after the first coordinator stopped confirming); False: different tasks under the same
    #: seqs; None: not known (a journal keeps no task ids)
    same_tasks: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "seqs": [self.lo, self.hi], "journals": list(self.journals),
                "same_tasks": self.same_tasks}


def _read(path: Path) -> tuple[dict[str, list[tuple[int, int]]], dict[str, tuple[int | None, int | None]]]:
    if not path.exists():
        return {}, {}
    with open_reader(path, timeout=30) as reader:
        return reader.reading_seq_ranges(), reader.agent_reports()


def check(journal_path: Path | str) -> dict[str, AgentCompleteness]:
    """Per agent: journaled readings, seq gaps, and what its heartbeat reported."""
    ranges, reported = _read(Path(journal_path))
    return _judge(ranges, reported)


def check_fleet(journal_paths: list[Path]) -> tuple[dict[str, AgentCompleteness], list[Duplicate]]:
    """Several coordinators' journals as one fleet: each agent's seqs merged across them.

    Why merged: with a shared ingest queue each journal holds an interleaved part of every
    agent's sequence, so a journal alone shows gaps that another one fills. A seq stored in
    two journals is a duplicate (a re-send stored by a second coordinator), never merged away."""
    spans: dict[str, list[tuple[int, int, str]]] = {}
    reported: dict[str, tuple[int | None, int | None]] = {}
    for path in journal_paths:
        ranges, reports = _read(Path(path))
        for agent, islands in ranges.items():
            spans.setdefault(agent, []).extend((lo, hi, str(path)) for lo, hi in islands)
        for agent, (dropped, unconfirmed) in reports.items():
            old = reported.get(agent, (None, None))
            reported[agent] = (_max(old[0], dropped), _max(old[1], unconfirmed))
    merged: dict[str, list[tuple[int, int]]] = {}
    duplicates: list[Duplicate] = []
    for agent, items in spans.items():
        items.sort()
        union: list[tuple[int, int]] = []
        reach, owner = 0, ""  # highest seq covered so far, and the journal that covered it
        for lo, hi, journal in items:
            if lo <= reach:  # ranges within one journal never overlap: this is a second journal
                duplicates.append(Duplicate(agent, lo, min(hi, reach), (owner, journal)))
            if union and lo <= union[-1][1] + 1:
                union[-1] = (union[-1][0], max(union[-1][1], hi))
            else:
                union.append((lo, hi))
            if hi > reach:
                reach, owner = hi, journal
        merged[agent] = union
    return _judge(merged, reported), _compare(duplicates)


def _compare(duplicates: list[Duplicate]) -> list[Duplicate]:
    """Each duplicate with `same_tasks` read from both its journals (each journal opened once)."""
    with ExitStack() as stack:
        readers: dict[str, JournalReader] = {}

        def task_ids(path: str, d: Duplicate) -> dict[int, str] | None:
            if path not in readers:
                readers[path] = stack.enter_context(open_reader(Path(path), timeout=30))
            return readers[path].reading_task_ids(d.agent_id, d.lo, d.hi)

        out = []
        for d in duplicates:
            first, second = (task_ids(path, d) for path in d.journals)
            out.append(d if first is None or second is None else replace(d, same_tasks=first == second))
        return out


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _judge(ranges: dict[str, list[tuple[int, int]]],
           reported: dict[str, tuple[int | None, int | None]]) -> dict[str, AgentCompleteness]:
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


def add_duplicates(report: Any, duplicates: list[Duplicate]) -> None:
    for d in duplicates:
        what = f"seq {d.lo}" if d.lo == d.hi else f"seqs {d.lo}-{d.hi} ({d.hi - d.lo + 1})"
        why = {True: ": the same signed tasks, re-sent by the agent after the first coordinator stopped "
                     "confirming them (down or behind for longer than the agents' resend_after); each ran twice",
               False: ": different tasks under the same seqs (an agent reusing its seqs, or a forged record); "
                      "compare them with `edge-audit show TASK_ID --data-dir DIR` for each coordinator",
               None: ""}[d.same_tasks]
        report.add(None, DUPLICATE, f"{d.agent_id}: {what} stored in both {d.journals[0]} and {d.journals[1]}{why}")
