"""Fixtures of the agent tests: enrolled data dirs and cleaned-up child processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import FleetPKI

from .support import Proc, Receiver


@pytest.fixture
def procs() -> Iterator[list]:
    """Append every started Proc/Receiver here; all are killed (group) at teardown."""
    started: list[Proc | Receiver] = []
    yield started
    for p in reversed(started):
        p.stop()


@pytest.fixture
def receiver_factory(tmp_path: Path, test_pki: FleetPKI, procs: list):
    def make(broker_url: str, name: str = "receiver") -> Receiver:
        rcv = Receiver(tmp_path / name, broker_url, test_pki)
        procs.append(rcv)
        return rcv.start()
    return make
