"""The idle-memory helpers: glibc malloc tuning, and the forwarder calling it when idle."""

from __future__ import annotations

import threading
from pathlib import Path

from agent import memory
from agent.forwarder import Backoff, Forwarder
from agent.outbox import Outbox
from agent.sensors.base import Sample


def test_malloc_tuning_works_on_glibc() -> None:
    # This machine runs glibc (Debian): both calls must reach it, not fall back to no-ops.
    assert memory.limit_arenas(2) is True
    assert isinstance(memory.trim(), bool)
    assert memory._glibc() is not False


def test_forwarder_calls_on_idle_after_the_backlog_is_sent(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "dev-1")
    box.add_samples([Sample("t", 1.0, "C", 1.0)])
    sent: list[int] = []
    idle = threading.Event()
    sent_when_idle: list[int] = []

    def on_idle() -> None:
        sent_when_idle.append(len(sent))
        idle.set()

    fwd = Forwarder(
        outbox_factory=lambda: Outbox(tmp_path / "o.db", "dev-1"),
        sensors=[], interval=3600.0, publish=lambda item: sent.append(item.id), reset_connection=lambda: None,
        backoff=Backoff(0.01, 0.05), idle_close_after=60.0, on_idle=on_idle,
    )
    fwd.start()
    try:
        assert idle.wait(30), "the flusher never reported idle"
    finally:
        fwd.stop()
    assert sent_when_idle[0] == 1, "on_idle must run only after the backlog was sent"
    assert box.backlog() == 0 and len(sent) == 1
