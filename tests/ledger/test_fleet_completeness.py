"""Completeness merged across several coordinators' journals (ledger/completeness.py check_fleet):
each journal holds an interleaved part of every agent's sequence; together they must hold every
seq exactly once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ledger import audit, completeness


def journal(path: Path, rows: list[tuple[str, int]]) -> Path:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE readings (agent_id TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (agent_id, seq))")
    db.executemany("INSERT INTO readings VALUES (?, ?)", rows)
    db.commit()
    db.close()
    return path


def test_interleaved_journals_are_complete_together(tmp_path: Path) -> None:
    a = journal(tmp_path / "a.db", [("pi", s) for s in (1, 2, 5, 6, 9)] + [("x", 1)])
    b = journal(tmp_path / "b.db", [("pi", s) for s in (3, 4, 7, 8, 10)] + [("x", 2)])
    alone = completeness.check(a)
    assert alone["pi"].gaps == [(3, 4), (7, 8)]  # one journal alone shows what the other holds
    merged, duplicates = completeness.check_fleet([a, b])
    assert duplicates == []
    assert (merged["pi"].stored, merged["pi"].last_seq, merged["pi"].gaps) == (10, 10, [])
    assert (merged["x"].stored, merged["x"].gaps) == (2, [])


def test_a_seq_in_two_journals_is_a_failing_duplicate_and_a_gap_fails(tmp_path: Path) -> None:
    a = journal(tmp_path / "a.db", [("pi", s) for s in (1, 2, 3, 4)])
    b = journal(tmp_path / "b.db", [("pi", s) for s in (3, 4, 5, 8)])
    merged, duplicates = completeness.check_fleet([a, b])
    assert [(d.agent_id, d.lo, d.hi, d.journals) for d in duplicates] == [("pi", 3, 4, (str(a), str(b)))]
    assert merged["pi"].gaps == [(6, 7)]
    report = audit.AuditReport()
    completeness.add_findings(report, merged)
    completeness.add_duplicates(report, duplicates)
    assert sorted(f.kind for f in report.findings) == ["seq_duplicate", "seq_gap"]
    assert not report.ok
