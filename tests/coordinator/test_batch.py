"""Batched ingestion (coordinator.batch) against a real journal: one commit per batch,
acks only after it, a journal failure puts the whole batch back unacked.

The Celery requests are stand-ins recording what the consumer did with each message
(ack, requeue, drop); the Ingestor, Journal and JournalOutage are the real ones.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from coordinator import celery_app
from coordinator.batch import BatchConsumer
from coordinator.celery_app import JournalOutage
from coordinator.ingest import INGEST, Ingestor, TaskContext
from coordinator.metrics import standard_metrics
from ledger.journal import Journal

from .test_ingest import reading, signer_for


def ingest_run(reading: Any = None) -> None:
    """The signature of the coordinator's edge.ingest task (its one argument)."""


INGEST_TASK = SimpleNamespace(name=INGEST, run=ingest_run, request=None, push_request=lambda **_: None, pop_request=lambda: None)


class Request:
    """What the consumer needs of a Celery SignedRequest; remembers what became of the message."""

    def __init__(self, task_id: str, payload: Any, signer: Any, revoked: bool = False) -> None:
        self.id, self.name, self.task = task_id, INGEST, INGEST_TASK
        self.args, self.kwargs = (payload,), {}
        self.signer = signer
        self.request_dict = {"retries": 0}
        self.delivery_info: dict[str, Any] = {}
        self._revoked = revoked
        self.fate: str | None = None
        self.events: list[str] = []

    def revoked(self) -> bool:
        if self._revoked:  # SignedRequest records the refusal and acks
            self.acknowledge()
        return self._revoked

    def on_accepted(self, pid: int, accepted: float) -> None:
        pass

    def acknowledge(self) -> None:
        assert self.fate is None, f"{self.id} settled twice"
        self.fate = "acked"

    def reject(self, requeue: bool = False) -> None:
        assert self.fate is None, f"{self.id} settled twice"
        self.fate = "requeued" if requeue else "dropped"

    def send_event(self, type: str, **_: Any) -> None:
        self.events.append(type)


class Timer:
    def __init__(self) -> None:
        self.entries: list[Any] = []

    def call_after(self, secs: float, fun: Any) -> Any:
        entry = SimpleNamespace(secs=secs, fun=fun, cancelled=False)
        entry.cancel = lambda: setattr(entry, "cancelled", True)
        self.entries.append(entry)
        return entry


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(celery_app, "JOURNAL_RETRY_PAUSE", 0.0)
    journal = Journal(tmp_path / "journal.db")
    told: list[tuple[str, int, int]] = []

    def on_reading(agent: str, seq: int) -> None:  # what the receipt book sees, and whether it is committed
        with sqlite3.connect(journal.path) as other:
            stored = other.execute("SELECT count(*) FROM readings WHERE agent_id = ? AND seq = ?",
                                   (agent, seq)).fetchone()[0]
        told.append((agent, seq, stored))

    ingestor = Ingestor(journal, standard_metrics(), on_reading=on_reading)
    outage = JournalOutage(ingestor)

    def context(request: Any, name: str) -> TaskContext:
        return TaskContext(task_id=request.id, task_name=name, signer=request.signer, received_at=0.0)

    consumer = BatchConsumer(SimpleNamespace(), ingestor, outage, context, size=100, wait=0.02)
    statements: list[str] = []
    journal.db.conn.set_trace_callback(statements.append)
    yield SimpleNamespace(consumer=consumer, ingestor=ingestor, journal=journal, outage=outage, told=told,
                          statements=statements)
    journal.close()


def commits(statements: list[str]) -> int:
    return sum(1 for s in statements if s.strip().upper() == "COMMIT")


def test_mixed_batch_commits_once_and_acks_each_after_the_commit(setup, test_pki) -> None:
    s = signer_for(test_pki, "bat-a")
    setup.ingestor.run(TaskContext("t-old", INGEST, s, 0.0), reading("bat-a", 1))  # journaled before the batch
    before = commits(setup.statements)
    batch = [
        Request("t-1", reading("bat-a", 2), s),
        Request("t-old", reading("bat-a", 1), s),            # redelivered: task id already journaled
        Request("t-2", reading("bat-a", 2), s),              # seq 2 again under another id (same batch)
        Request("t-3", reading("someone-else", 3), s),       # refused: claims another agent
        Request("t-1", reading("bat-a", 2), s),              # the same task id twice in one batch
        Request("t-4", reading("bat-a", 4), s, revoked=True),  # signer revoked meanwhile: never runs
        Request("t-5", reading("bat-a", 5), s),
    ]
    setup.consumer.run(batch)

    assert commits(setup.statements) - before == 1
    assert [r.fate for r in batch] == ["acked"] * 7
    assert [r.events for r in batch] == [["task-succeeded"]] * 5 + [[], ["task-succeeded"]]
    rows = {r["task_id"]: r for r in setup.journal.rows()}
    assert set(rows) == {"t-old", "t-1", "t-2", "t-3", "t-5"}
    assert (rows["t-2"]["status"], rows["t-3"]["status"]) == ("REJECTED", "REJECTED")
    assert sorted(r[0] for r in setup.journal.db.execute("SELECT seq FROM readings")) == [1, 2, 5]
    # receipts told after the commit only, and only of stored readings (duplicates re-confirmed)
    assert sorted(setup.told) == [("bat-a", 1, 1), ("bat-a", 1, 1), ("bat-a", 2, 1), ("bat-a", 2, 1), ("bat-a", 5, 1)]
    m = setup.ingestor.metrics
    assert m.get("edgeledger_tasks_received_total", task=INGEST) == 1 + 6
    assert m.get("edgeledger_tasks_executed_total", task=INGEST) == 1 + 2
    assert m.get("edgeledger_tasks_duplicate_total", task=INGEST) == 2
    assert m.get("edgeledger_tasks_refused_total", reason="duplicate_seq") == 1
    assert m.get("edgeledger_tasks_refused_total", reason="identity_mismatch") == 1


def test_journal_failure_requeues_the_whole_batch_unacked_then_resumes(setup, test_pki) -> None:
    s = signer_for(test_pki, "bat-b")
    # a real SQLite error on the third reading's write, inside the batch transaction
    setup.journal.db.execute("CREATE TRIGGER fail_seq_3 BEFORE INSERT ON readings WHEN NEW.seq = 3 "
                             "BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END")
    batch = [Request(f"u-{n}", reading("bat-b", n), s) for n in range(1, 6)]
    setup.consumer.run(batch)

    assert [r.fate for r in batch] == ["requeued"] * 5
    assert list(setup.journal.rows()) == []
    assert setup.told == []
    m = setup.ingestor.metrics
    assert m.get("edgeledger_journal_write_failures_total", task=INGEST) == 5
    assert m.get("edgeledger_tasks_executed_total", task=INGEST) == 0
    assert setup.outage.failing

    setup.journal.db.execute("DROP TRIGGER fail_seq_3")  # the journal is writable again: the redelivery commits
    again = [Request(f"u-{n}", reading("bat-b", n), s) for n in range(1, 6)]
    setup.consumer.run(again)
    assert [r.fate for r in again] == ["acked"] * 5
    assert not setup.outage.failing
    assert sorted(r[0] for r in setup.journal.db.execute("SELECT seq FROM readings")) == [1, 2, 3, 4, 5]
    assert m.get("edgeledger_tasks_executed_total", task=INGEST) == 5


def test_flushes_when_full_or_after_the_wait(setup, test_pki) -> None:
    s = signer_for(test_pki, "bat-c")
    consumer, timer = setup.consumer, Timer()
    consumer.connected(timer)
    consumer.size = 3
    idle = Request("v-0", reading("bat-c", 10), s)
    consumer.add(idle)  # an idle worker: commit at the next event-loop turn, no wait
    assert idle.fate is None and timer.entries[-1].secs == 0
    timer.entries[-1].fun()
    assert idle.fate == "acked"

    first = [Request(f"v-{n}", reading("bat-c", n), s) for n in range(1, 4)]
    for request in first[:2]:
        consumer.add(request)
    assert [r.fate for r in first[:2]] == [None, None] and timer.entries[-1].secs == 0
    consumer.add(first[2])  # full: runs now, and the pending wait is cancelled
    assert [r.fate for r in first] == ["acked"] * 3 and timer.entries[-1].cancelled

    late = Request("v-4", reading("bat-c", 4), s)
    consumer.add(late)  # after a large batch (>= a tenth of the size, at least 2): gather for batch_wait
    assert late.fate is None and len(timer.entries) == 3 and timer.entries[-1].secs == 0.02
    timer.entries[-1].fun()  # the wait is over
    assert late.fate == "acked"
    assert sorted(r[0] for r in setup.journal.db.execute("SELECT seq FROM readings")) == [1, 2, 3, 4, 10]


def test_a_new_connection_drops_what_the_old_one_buffered_for_redelivery(setup, test_pki) -> None:
    s = signer_for(test_pki, "bat-d")
    consumer, timer = setup.consumer, Timer()
    consumer.connected(timer)
    buffered = [Request(f"w-{n}", reading("bat-d", n), s) for n in (1, 2)]
    for request in buffered:
        consumer.add(request)
    consumer.connected(Timer())  # the broker connection was lost and Celery rebuilt its strategies
    assert timer.entries[0].cancelled and consumer.pending == []
    assert [r.fate for r in buffered] == [None, None]  # never settled: the broker redelivers them
    assert list(setup.journal.rows()) == []
    redelivered = [Request(f"w-{n}", reading("bat-d", n), s) for n in (1, 2)]
    consumer.run(redelivered)
    assert [r.fate for r in redelivered] == ["acked", "acked"]
    assert sorted(r[0] for r in setup.journal.db.execute("SELECT seq FROM readings")) == [1, 2]


def test_replay_guard_marks_a_whole_batch_done_in_one_transaction(tmp_path: Path) -> None:
    import time

    from security.replay import ReplayGuard

    guard = ReplayGuard(tmp_path / "replay.sqlite")
    for key in ("a/1:0", "a/2:0", "a/3:0"):
        guard.accept(key, f"digest-{key}", time.time(), "a")
    statements: list[str] = []
    guard._conn().set_trace_callback(statements.append)
    guard.mark_done_many(["a/1:0", "a/3:0"])
    assert sum(1 for s in statements if s.strip().lower() == "commit") == 1
    with sqlite3.connect(guard.path) as other:
        assert dict(other.execute("SELECT key, done FROM seen")) == {"a/1:0": 1, "a/2:0": 0, "a/3:0": 1}
