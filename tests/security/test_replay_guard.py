"""Replay guard semantics: once per (task id, retry), persistent across restarts, and a
broker redelivery after a crash is let through only for an unfinished task."""

from __future__ import annotations

import time

import pytest

from security.replay import ReplayGuard
from security.signing import SignatureRefused


def test_a_key_is_accepted_once_and_survives_a_restart(tmp_path):
    guard = ReplayGuard(tmp_path / "r.sqlite", max_age_seconds=300)
    now = time.time()
    guard.accept("t1:0", "d1", now, "agent-a")
    with pytest.raises(SignatureRefused, match="replay"):
        guard.accept("t1:0", "d2", now, "agent-a")
    guard.accept("t1:1", "d3", now, "agent-a")  # a retry is a new key
    guard.mark_done("t1:0")
    restarted = ReplayGuard(tmp_path / "r.sqlite", max_age_seconds=300)
    with pytest.raises(SignatureRefused, match="replay"):
        restarted.accept("t1:0", "d1", now, "agent-a")  # finished: never again


def test_redelivery_after_a_crash_is_accepted_once_for_unfinished_tasks(tmp_path):
    first = ReplayGuard(tmp_path / "r.sqlite", max_age_seconds=300)
    now = time.time()
    first.accept("t2:0", "digest", now, "agent-a")
    with pytest.raises(SignatureRefused, match="replay"):
        first.accept("t2:0", "digest", now, "agent-a")  # same process: a duplicate
    after_crash = ReplayGuard(tmp_path / "r.sqlite", max_age_seconds=300)
    with pytest.raises(SignatureRefused, match="replay"):
        after_crash.accept("t2:0", "other-digest", now, "agent-a")  # not the same message
    after_crash.accept("t2:0", "digest", now, "agent-a")  # the broker's redelivery
    with pytest.raises(SignatureRefused, match="replay"):
        after_crash.accept("t2:0", "digest", now, "agent-a")


def test_stale_messages_are_refused_and_old_entries_pruned(tmp_path):
    guard = ReplayGuard(tmp_path / "r.sqlite", max_age_seconds=60)
    with pytest.raises(SignatureRefused, match="stale"):
        guard.accept("t3:0", "d", time.time() - 120, "agent-a")
    guard.accept("t4:0", "d", time.time() - 50, "agent-a")
    assert guard.prune(now=time.time() + 1000) == 1
    assert not guard.seen("t4:0")
