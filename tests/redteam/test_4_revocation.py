"""Revocation checked at execution time: a task admitted before the agent was revoked
must not run after it (an ETA holds it in the worker's memory meanwhile)."""

from __future__ import annotations

import time

import pytest

from tests.coordinator.support import cli

from .attacker import INGEST_TOPIC, eta_in
from .fleet import REVOKED_ETA, Fleet, settle

pytestmark = pytest.mark.slow

COUNTDOWN = 10.0


def test_task_with_eta_from_an_agent_revoked_before_the_eta_never_runs(fleet: Fleet) -> None:
    a = fleet.attacker(REVOKED_ETA)
    control = a.reading_task(1)  # proves the identity worked before the revocation
    assert a.publish(INGEST_TOPIC, control) == 0
    settle(fleet, lambda: fleet.executions(control["headers"]["id"]), 45, "the control reading journaled")
    before = fleet.refusals("cert_revoked")
    sent = time.monotonic()
    delayed = a.reading_task(2, eta=eta_in(COUNTDOWN))
    tid = delayed["headers"]["id"]
    assert a.publish(INGEST_TOPIC, delayed) == 0
    a.close()
    out = cli("revoke", "--data-dir", str(fleet.data_dir), REVOKED_ETA)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - sent < COUNTDOWN, "revoke returned after the ETA: the test proves nothing"
    settle(fleet, lambda: fleet.quarantined(tid) or fleet.executions(tid), COUNTDOWN + 45,
           "the delayed task refused or executed")
    assert fleet.executions(tid) == [], "the revoked agent's delayed task was executed"
    assert [r.reason for r in fleet.quarantined(tid)] == ["cert_revoked"]
    assert fleet.refusals("cert_revoked") == before + 1
