"""End-to-end receipts, fast layer: outbox confirm/re-send, receipt ranges, replay vs re-send."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.outbox import Outbox
from agent.sensors.base import Sample
from coordinator.receipts import ReceiptBook, add_seq, make_receipt
from security.replay import ReplayGuard
from security.signing import SignatureRefused


def _samples(n: int) -> list[Sample]:
    return [Sample("t", float(i), "C", 1.0e9 + i) for i in range(n)]


def test_reading_stays_until_confirmed_and_is_resent_when_due(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "a-1", resend_after=30.0)
    box.add_samples(_samples(5))
    for item in box.pending():
        box.mark_sent(item.id, awaits_receipt=True)
    assert box.backlog() == 0 and box.unconfirmed() == 5
    assert box.pending() == []  # not due yet
    first_due = box.next_resend_at()
    assert first_due is not None
    due = first_due + 1.0  # all five were published within a second
    assert [i.kwargs["reading"]["seq"] for i in box.pending(now=due)] == [1, 2, 3, 4, 5]
    assert box.confirm(2, [(4, 4)]) == 3
    box.set_meta("last_receipt_at", repr(due))  # as if that receipt came just now, at `due`
    # receipts are coming: only 3 (below the highest confirmed seq 4: lost on the way) is re-sent
    assert [i.kwargs["reading"]["seq"] for i in box.pending(now=due)] == [3]
    assert box.stats()["confirmed"] == 3 and box.unconfirmed() == 2
    nxt = box.next_resend_at()
    assert nxt is not None and nxt <= due  # seq 3 is due now ...
    later = due + 30.0
    assert [i.kwargs["reading"]["seq"] for i in box.pending(now=later)] == [3, 5]  # ... all once receipts stop


class _Warnings:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def warning(self, msg: str, *args: object) -> None:
        self.messages.append(msg % args)


def test_drop_is_logged_once_per_episode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.outbox

    seen = _Warnings()  # the module's logger itself: other tests reconfigure logging
    monkeypatch.setattr(agent.outbox, "log", seen)
    box = Outbox(tmp_path / "o.db", "a-1", max_rows=3)
    box.add_samples(_samples(5))
    box.add_samples(_samples(2))
    assert box.stats()["dropped"] == 4
    assert sum("dropping the oldest" in m for m in seen.messages) == 1
    for item in box.pending():
        box.mark_sent(item.id, awaits_receipt=True)
    box.confirm(7)  # drained: the episode is over
    box.add_samples(_samples(4))
    assert sum("dropping the oldest" in m for m in seen.messages) == 2


def test_ranges_and_receipt_payload(tmp_path: Path) -> None:
    ranges: list[list[int]] = []
    for seq in (3, 1, 2, 7, 5, 6, 10):
        add_seq(ranges, seq)
    assert ranges == [[1, 3], [5, 7], [10, 10]]
    receipt = make_receipt("a-1", ranges, now=1.0)
    assert receipt == {"v": 1, "agent_id": "a-1", "upto": 3, "held": [[5, 7], [10, 10]], "issued_at": 1.0,
                       "checkpoint": None}
    assert make_receipt("a-1", [[4, 9]], now=1.0)["upto"] == 0  # 1..3 dropped by the agent: all in held


def test_book_sends_one_receipt_per_agent_with_news(tmp_path: Path) -> None:
    book = ReceiptBook(tmp_path / "absent.sqlite", batch=3)
    book.note("a-1", 1)
    book.note("a-1", 2)
    assert not book.wake.is_set()
    book.note("a-1", 3)
    assert book.wake.is_set()  # a full batch does not wait for the interval
    book.note("b-1", 1)
    got = {r["agent_id"]: (r["upto"], r["held"]) for r in book.take()}
    assert got == {"a-1": (3, []), "b-1": (1, [])}
    assert book.take() == []  # nothing new: no receipt


def test_replay_guard_accepts_a_resend_but_not_the_same_envelope_twice(tmp_path: Path) -> None:
    import time

    guard = ReplayGuard(tmp_path / "r.sqlite")
    now = time.time()
    guard.accept("a-1/id:0", "env-1", now, "a-1", allow_resend=True)
    guard.accept("a-1/id:0", "env-2", now, "a-1", allow_resend=True)  # a new envelope: a re-send
    for digest in ("env-1", "env-2"):
        with pytest.raises(SignatureRefused) as exc:
            guard.accept("a-1/id:0", digest, now, "a-1", allow_resend=True)
        assert exc.value.reason == "replay"
    with pytest.raises(SignatureRefused):  # tasks without a deduping consumer: one envelope per id
        guard.accept("a-1/id:0", "env-3", now, "a-1")
    guard.release("a-1/id:0", "env-1")  # journal refused it: the broker redelivers it, it must pass
    guard.accept("a-1/id:0", "env-1", now, "a-1", allow_resend=True)


def test_each_resend_of_a_reading_waits_twice_as_long_up_to_the_cap(tmp_path: Path) -> None:
    """A coordinator that is behind must not get the fleet's backlog again every
    resend_after: a row's wait doubles per re-send, capped at RESEND_BACKOFF_MAX."""
    from agent.outbox import RESEND_BACKOFF_MAX

    ra = 10.0
    box = Outbox(tmp_path / "o.db", "a-1", resend_after=ra)
    box.add_samples(_samples(1))
    waits = []
    for _ in range(7):
        (item,) = box.pending(now=time.time() + 1e6)  # due (or never sent)
        box.mark_sent(item.id, awaits_receipt=True)
        sent_at = box.db.execute("SELECT sent_at FROM outbox").fetchone()[0]
        due = box.next_resend_at()
        assert due is not None
        assert box.pending(now=due - 0.01) == []  # not a moment early ...
        assert len(box.pending(now=due)) == 1  # ... and due exactly then
        waits.append(round(due - sent_at, 6))
    assert waits == [ra, 2 * ra, 4 * ra, 8 * ra, RESEND_BACKOFF_MAX * ra, RESEND_BACKOFF_MAX * ra,
                     RESEND_BACKOFF_MAX * ra]


def test_an_outbox_from_before_the_backoff_gets_the_column_and_its_rows_stay_due(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "o.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, task_name TEXT NOT NULL, task_id TEXT NOT NULL "
        "UNIQUE, kwargs TEXT NOT NULL, created_at REAL NOT NULL, seq INTEGER, sent_at REAL);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO outbox(task_name, task_id, kwargs, created_at, seq, sent_at) "
        "VALUES ('edge.ingest', 'id-1', '{\"reading\": {\"seq\": 1}}', 1.0, 1, 100.0);")
    old.commit()
    old.close()
    box = Outbox(path, "a-1", resend_after=10.0)
    assert box.next_resend_at() == 110.0
    assert [i.task_id for i in box.pending(now=110.0)] == ["id-1"]
