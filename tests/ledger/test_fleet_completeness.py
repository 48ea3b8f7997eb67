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


def journal_with_tasks(path: Path, rows: list[tuple[str, int, str]]) -> Path:
    """A `readings` table as the coordinator keeps it: each seq with its task id."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE readings (agent_id TEXT NOT NULL, seq INTEGER NOT NULL, task_id TEXT NOT NULL, "
               "PRIMARY KEY (agent_id, seq))")
    db.executemany("INSERT INTO readings VALUES (?, ?, ?)", rows)
    db.commit()
    db.close()
    return path


def test_a_duplicate_says_whether_both_journals_hold_the_same_signed_tasks(tmp_path: Path) -> None:
    """The same task ids in both journals: one reading re-sent after a coordinator stopped
    confirming it (each ran twice). Different ones: a conflict. Both fail; the finding says which."""
    a = journal_with_tasks(tmp_path / "a.db", [("pi", s, f"t{s}") for s in (1, 2, 3)] + [("q", 1, "q1")])
    b = journal_with_tasks(tmp_path / "b.db", [("pi", s, f"t{s}") for s in (3, 4)] + [("q", 1, "other")])
    merged, duplicates = completeness.check_fleet([a, b])
    assert {(d.agent_id, d.lo, d.hi, d.same_tasks) for d in duplicates} == {("pi", 3, 3, True), ("q", 1, 1, False)}
    report = audit.AuditReport()
    completeness.add_duplicates(report, duplicates)
    messages = {f.detail.split(":")[0]: f.detail for f in report.findings if f.kind == "seq_duplicate"}
    assert "the same signed tasks" in messages["pi"] and "resend_after" in messages["pi"]
    assert "different tasks under the same seqs" in messages["q"]
    assert not report.ok
    plain = completeness.check_fleet([journal(tmp_path / "c.db", [("pi", 1)]), journal(tmp_path / "d.db", [("pi", 1)])])
    assert [d.same_tasks for d in plain[1]] == [None]  # journals without task ids: not known, still failing


def test_fleet_cli_refuses_one_journal_settings_and_a_dir_given_twice(tmp_path: Path) -> None:
    """`edge-audit fleet` takes each coordinator's settings from its data dir: a single-journal
    flag, or the same dir twice (which would show every reading as a duplicate), is a usage error."""
    import os
    import subprocess
    import sys

    from security import exit_codes

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AUDIT_")}

    def fleet(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ledger.audit_cli", "fleet", *argv], capture_output=True,
                              text=True, cwd=root, env=env, timeout=120)

    a, b = tmp_path / "a", tmp_path / "b"
    out = fleet(str(a), str(b), "--contract", "0x" + "11" * 20)
    assert out.returncode == exit_codes.USAGE and "--contract names one journal's setting" in out.stderr
    out = fleet(str(a), str(tmp_path / "." / "a"))
    assert out.returncode == exit_codes.USAGE and "given twice" in out.stderr
