"""ledger.sqlite_files' start-up check: a full scan only after an unclean stop, and a
damaged file still found whichever path the check takes."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from ledger.sqlite_files import (
    clean_stop_marker,
    header_reason,
    mark_clean_stop,
    unreadable_at_start,
    unreadable_reason,
)


def make_db(path: Path, rows: int = 300) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE filler (x TEXT)")
    conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 400,) for _ in range(rows)])
    conn.execute("CREATE INDEX filler_x ON filler (x)")
    conn.commit()
    conn.close()  # last connection: checkpointed, -wal removed
    return path


def damage_interior_page(path: Path) -> None:
    """Overwrite the last page with garbage, keeping size, mtime and inode."""
    st = path.stat()
    page = int.from_bytes(path.read_bytes()[16:18], "big")
    with open(path, "r+b") as fh:
        fh.seek(st.st_size - page)
        fh.write(b"\xff" * page)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_sound_file_passes_both_paths(tmp_path: Path) -> None:
    db = make_db(tmp_path / "a.sqlite")
    assert unreadable_at_start(db) is None  # no record: full check
    assert mark_clean_stop(db) and clean_stop_marker(db).exists()
    assert unreadable_at_start(db) is None  # record: cheap check
    assert not clean_stop_marker(db).exists()  # consumed: a crash now means a full check next time


def test_absent_file_is_fine_and_leaves_no_record(tmp_path: Path) -> None:
    assert unreadable_at_start(tmp_path / "none.sqlite") is None
    assert mark_clean_stop(tmp_path / "none.sqlite") is False
    assert not clean_stop_marker(tmp_path / "none.sqlite").exists()


def test_without_a_clean_stop_record_the_full_scan_finds_interior_damage(tmp_path: Path) -> None:
    db = make_db(tmp_path / "a.sqlite")
    damage_interior_page(db)
    assert unreadable_at_start(db) is not None
    assert unreadable_reason(db) is not None


def test_a_clean_stop_record_skips_the_full_scan_only_for_the_same_file(tmp_path: Path) -> None:
    db = make_db(tmp_path / "a.sqlite")
    assert mark_clean_stop(db)
    damage_interior_page(db)  # rot in place, size/mtime/inode kept: what the cheap path does not read
    assert unreadable_at_start(db) is None  # the full scan was skipped ...
    assert unreadable_at_start(db) is not None  # ... once: the record is consumed, the next start scans
    db2 = make_db(tmp_path / "b.sqlite")
    assert mark_clean_stop(db2)
    conn = sqlite3.connect(db2)  # changed while stopped (another tool): mtime/size differ
    conn.execute("INSERT INTO filler VALUES ('y')")
    conn.commit()
    conn.close()
    damage_interior_page(db2)
    os.utime(db2)  # a touch after the damage, as any write would leave
    assert unreadable_at_start(db2) is not None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "header"])
def test_damage_after_a_clean_stop_is_found_by_the_cheap_check(tmp_path: Path, damage: str) -> None:
    db = make_db(tmp_path / "a.sqlite")
    assert mark_clean_stop(db)
    data = db.read_bytes()
    st = db.stat()
    if damage == "truncated":
        db.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        db.write_bytes(b"\x00garbage" * (len(data) // 8))
    else:
        db.write_bytes(data[:16] + b"\x00\x03" + data[18:])  # page size 3
    os.utime(db, ns=(st.st_atime_ns, st.st_mtime_ns))
    clean_stop_marker(db).write_text(clean_stop_marker(db).read_text().replace(
        f'"size": {st.st_size}', f'"size": {db.stat().st_size}'))  # even if the record matched
    assert unreadable_at_start(db) is not None
    assert header_reason(db) is not None


def test_an_idle_open_connection_is_checkpointed_and_recorded(tmp_path: Path) -> None:
    db = make_db(tmp_path / "a.sqlite")
    idle = sqlite3.connect(db)
    idle.execute("INSERT INTO filler VALUES ('z')")
    idle.commit()  # frames in -wal, connection still open (a per-thread one nobody closed)
    try:
        assert Path(f"{db}-wal").stat().st_size > 0
        assert mark_clean_stop(db) and Path(f"{db}-wal").stat().st_size == 0
        assert unreadable_at_start(db) is None
    finally:
        idle.close()


def test_no_record_while_a_reader_holds_the_write_ahead_log(tmp_path: Path) -> None:
    db = make_db(tmp_path / "a.sqlite")
    writer, reader = sqlite3.connect(db), sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("INSERT INTO filler VALUES ('z')")
        writer.commit()
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM filler").fetchone()  # a snapshot that includes the log
        assert mark_clean_stop(db, timeout=0.1) is False and not clean_stop_marker(db).exists()
    finally:
        reader.close()
        writer.close()


def test_a_damaged_record_means_a_full_scan(tmp_path: Path) -> None:
    db = make_db(tmp_path / "a.sqlite")
    assert mark_clean_stop(db)
    clean_stop_marker(db).write_text("{not json")
    damage_interior_page(db)
    assert unreadable_at_start(db) is not None
