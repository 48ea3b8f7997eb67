"""The registry's "heard from" upsert (coordinator/registry.py): one SQL statement per
agent, the same row whether an agent is touched one reading at a time or per batch."""

from __future__ import annotations

import sqlite3

import sqlite_utils

from coordinator import registry


def _db() -> sqlite_utils.Database:
    db = sqlite_utils.Database(sqlite3.connect(":memory:"))
    registry.ensure_schema(db)
    return db


def _row(db: sqlite_utils.Database, agent: str) -> dict:
    return dict(db[registry.AGENTS].get(agent))  # type: ignore[union-attr]


def test_first_touch_inserts_and_later_ones_update_in_place() -> None:
    db = _db()
    registry.touch(db, "a", task="edge.ingest", fingerprint="f1", cert_not_after=2e9, readings=1, seq=5, now=100.0)
    row = _row(db, "a")
    assert (row["first_seen"], row["last_seen"], row["last_task"]) == (100.0, 100.0, "edge.ingest")
    assert (row["readings"], row["last_seq"], row["fingerprint"], row["cert_not_after"]) == (1, 5, "f1", 2e9)
    assert row["outbox_backlog"] == 0
    # a lower seq never moves last_seq back; no fingerprint or expiry keeps the stored ones
    registry.touch(db, "a", task="edge.heartbeat", readings=0, seq=None, now=200.0)
    registry.touch(db, "a", task="edge.ingest", readings=2, seq=3, now=300.0)
    row = _row(db, "a")
    assert (row["first_seen"], row["last_seen"], row["last_task"]) == (100.0, 300.0, "edge.ingest")
    assert (row["readings"], row["last_seq"], row["fingerprint"], row["cert_not_after"]) == (3, 5, "f1", 2e9)
    registry.touch(db, "a", task="edge.ingest", fingerprint="f2", readings=1, seq=9, now=400.0)
    assert (_row(db, "a")["last_seq"], _row(db, "a")["fingerprint"]) == (9, "f2")
    assert db[registry.AGENTS].count == 1


def test_heartbeat_sets_only_the_fields_it_carries_with_their_types() -> None:
    db = _db()
    registry.touch(db, "h", task="edge.heartbeat", heartbeat={"outbox_backlog": 7, "dropped": 2, "version": "1.2",
                                                            "interval": 5, "unconfirmed": "x"}, now=1.0)
    row = _row(db, "h")
    assert (row["outbox_backlog"], row["dropped"], row["version"], row["interval"]) == (7, 2, "1.2", 5.0)
    assert row["unconfirmed"] is None and row["takeovers"] is None  # a string is not a count; absent stays absent
    registry.touch(db, "h", task="edge.heartbeat", heartbeat={"takeovers": 1, "takeover_last_at": 9.5}, now=2.0)
    row = _row(db, "h")
    assert (row["outbox_backlog"], row["dropped"], row["takeovers"], row["takeover_last_at"]) == (0, 2, 1, 9.5)


def test_a_batch_touch_equals_the_same_touches_one_by_one() -> None:
    common = {"task": "edge.ingest", "fingerprint": "fp", "cert_not_after": 3e9}
    one, many = _db(), _db()
    for agent, seqs in (("x", [1, 2, 3]), ("y", [7]), ("x", [4])):
        for seq in seqs:
            registry.touch(one, agent, readings=1, seq=seq, now=50.0, **common)
    registry.touch_readings(many, [("x", 3, 3, common), ("y", 1, 7, common)], now=50.0)
    registry.touch_readings(many, [("x", 1, 4, common)], now=50.0)
    assert list(one[registry.AGENTS].rows) == list(many[registry.AGENTS].rows)
    assert _row(many, "x")["readings"] == 4 and _row(many, "x")["last_seq"] == 4
