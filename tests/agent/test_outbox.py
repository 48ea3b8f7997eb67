"""Outbox: seq assigned at store time, send order = store order, bound with oldest-first drop."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from agent.forwarder import Backoff, Forwarder
from agent.outbox import Outbox, reading_task_id
from agent.sensors.base import Sample


def _samples(n: int, start: float = 0.0) -> list[Sample]:
    return [Sample("s", float(i), "u", start + i) for i in range(n)]


def test_seq_is_monotonic_and_survives_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "dev-1")
    first = box.add_samples(_samples(3))
    assert [r["seq"] for r in first] == [1, 2, 3]
    for item in box.pending():
        box.mark_sent(item.id)
    box.close()
    box = Outbox(tmp_path / "o.db", "dev-1")
    assert [r["seq"] for r in box.add_samples(_samples(2))] == [4, 5]
    assert box.stats()["sent"] == 3 and box.stats()["backlog"] == 2
    assert box.stats()["last_flush_at"] is not None


def test_pending_is_in_store_order_with_deterministic_task_ids(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "dev-1")
    box.add_samples(_samples(5))
    box.add_task("edge.command_result", "cmd-1", {"result": {"x": 1}})
    box.add_samples(_samples(1))
    items = box.pending()
    assert [i.task_name for i in items] == ["edge.ingest"] * 5 + ["edge.command_result", "edge.ingest"]
    assert [i.kwargs["reading"]["seq"] for i in items if i.task_name == "edge.ingest"] == [1, 2, 3, 4, 5, 6]
    assert items[0].task_id == reading_task_id("dev-1", 1) == reading_task_id("dev-1", 1)
    assert reading_task_id("dev-1", 1) != reading_task_id("dev-2", 1)
    reading = items[0].kwargs["reading"]
    assert set(reading) == {"agent_id", "sensor", "seq", "value", "unit", "sampled_at"}
    assert not box.add_task("edge.command_result", "cmd-1", {"result": {}}), "same task id stored twice"


def test_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "dev-1", max_rows=10)
    for _ in range(5):
        box.add_samples(_samples(5))
    seqs = [i.kwargs["reading"]["seq"] for i in box.pending()]
    assert seqs == list(range(16, 26)), "the newest 10 stay, in order"
    assert box.stats()["dropped"] == 15 and box.backlog() == 10


def test_heartbeats_replace_unsent_ones(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "dev-1")
    box.add_samples(_samples(1))
    box.replace_task("edge.heartbeat", "hb-1", {"status": {"n": 1}})
    box.replace_task("edge.heartbeat", "hb-2", {"status": {"n": 2}})
    items = box.pending()
    assert [(i.task_name, i.task_id) for i in items][1:] == [("edge.heartbeat", "hb-2")]
    assert items[0].task_name == "edge.ingest"


def test_two_threads_share_one_outbox_file(tmp_path: Path) -> None:
    def writer() -> None:
        box = Outbox(tmp_path / "o.db", "dev-1")
        for _ in range(50):
            box.add_samples(_samples(2))
        box.close()

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [i.kwargs["reading"]["seq"] for i in Outbox(tmp_path / "o.db", "dev-1").pending(1000)]
    assert seqs == list(range(1, 301))


def test_threads_opening_a_fresh_outbox_at_once_never_see_locked(tmp_path: Path) -> None:
    """Regression: the WAL switch of a fresh file answered "database is locked" to a second
    opener (SQLite skips the busy handler there); 200 rounds of 4 openers reproduced it
    ~90% of the time before the fix."""
    errors: list[Exception] = []

    def opener(path: Path) -> None:
        try:
            Outbox(path, "dev-1").close()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    for round_ in range(200):
        path = tmp_path / f"o{round_}.db"
        threads = [threading.Thread(target=opener, args=(path,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_backoff_is_jittered_and_bounded() -> None:
    """Full jitter (kombu_mqtt.backoff): delay n is uniform in [0, min(8, 0.5 * 2**n)]."""
    b = Backoff(0.5, 8.0, rng=random.Random(1))
    delays = [b.next() for _ in range(10)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    assert all(0.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[4:]) > 4.0  # the cap is reached, not just the first ceilings
    b.reset()
    assert b.next() <= 0.5


def test_forwarder_keeps_rows_until_publish_succeeds(tmp_path: Path) -> None:
    """Publish fails 3 times (broker away), then works: every row once, in order."""
    sent: list[int] = []
    failures = iter([True, True, True])

    def publish(item) -> None:
        if next(failures, False):
            raise ConnectionError("broker away")
        sent.append(item.kwargs["reading"]["seq"])

    box = Outbox(tmp_path / "o.db", "dev-1")
    box.add_samples(_samples(20))
    fwd = Forwarder(
        outbox_factory=lambda: Outbox(tmp_path / "o.db", "dev-1"),
        sensors=[], interval=3600.0, publish=publish, reset_connection=lambda: None,
        backoff=Backoff(0.01, 0.05),
    )
    fwd.start()
    try:
        assert fwd.flushed.wait(10)
    finally:
        fwd.stop()
    assert sent == list(range(1, 21))
    assert box.backlog() == 0 and box.stats()["sent"] == 20


def test_forwarder_samples_on_schedule_and_sends_heartbeats(tmp_path: Path) -> None:
    from agent.sensors.simulated import SimulatedSensor

    sent: list = []
    lock = threading.Lock()

    def publish(item) -> None:
        with lock:
            sent.append(item)

    def heartbeat(box: Outbox) -> None:
        box.replace_task("edge.heartbeat", f"hb-{len(sent)}-{random.random()}", {"status": {"backlog": box.backlog()}})

    fwd = Forwarder(
        outbox_factory=lambda: Outbox(tmp_path / "o.db", "dev-1"),
        sensors=[SimulatedSensor("dev-1")], interval=0.05, publish=publish, reset_connection=lambda: None,
        backoff=Backoff(0.01, 0.05), heartbeat=heartbeat, heartbeat_interval=0.2,
    )
    fwd.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with lock:
                names = [i.task_name for i in sent]
            if names.count("edge.ingest") >= 5 and "edge.heartbeat" in names:
                break
            time.sleep(0.02)
        fwd.set_interval(3600.0)  # takes effect at once: at most one more sample
        time.sleep(0.3)
        with lock:
            before = [i for i in sent if i.task_name == "edge.ingest"]
        time.sleep(0.3)
        with lock:
            after = [i for i in sent if i.task_name == "edge.ingest"]
    finally:
        fwd.stop()
    assert len(before) >= 5 and len(after) == len(before)
    assert [i.kwargs["reading"]["seq"] for i in after] == list(range(1, len(after) + 1))
    assert any(i.task_name == "edge.heartbeat" for i in sent)
