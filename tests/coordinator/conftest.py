"""Fixtures of the coordinator suites: a daemon of the test's own, always cleaned up."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agent.support import Proc, kill_group

from .support import CoordinatorProcess


@pytest.fixture
def coordinator(tmp_path: Path):
    """An `edge-coordinator` daemon (not yet started) in the test's own data dir."""
    proc = CoordinatorProcess(tmp_path / "coord")
    yield proc
    proc.cleanup()


@pytest.fixture
def procs():
    """Agent processes a test starts (tests.agent.support.Proc); all stopped at the end."""
    started: list[Proc] = []
    yield started
    for proc in started:
        kill_group(proc.proc)
