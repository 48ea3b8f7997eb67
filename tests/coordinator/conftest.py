"""Fixtures of the coordinator suites: a daemon of the test's own, always cleaned up."""

from __future__ import annotations

from pathlib import Path

import pytest

from .support import CoordinatorProcess


@pytest.fixture
def coordinator(tmp_path: Path):
    """An `edge-coordinator` daemon (not yet started) in the test's own data dir."""
    proc = CoordinatorProcess(tmp_path / "coord")
    yield proc
    proc.cleanup()
