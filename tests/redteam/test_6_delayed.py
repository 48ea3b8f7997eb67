"""Delayed tasks: an eta/countdown may hold a command up to `max_delay_seconds` (its
freshness runs from the eta, so it survives an offline agent and a restart); beyond
that the sender refuses it at send time and a receiver refuses it as `eta_too_far`.
The operator side here is the coordinator's own signing app (`coordinator.celery_app.make_app`,
what `edge-coordinator send --countdown` uses; tests/coordinator/test_cli_send.py checks
that command's one-line refusal)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from celery import Celery

from coordinator.config import load_config
from security.contract import RECEIPT_TASK
from security.quarantine import Quarantine
from security.signing import SigningError
from tests.support.celery_apps import close_app

from .attacker import INGEST_TOPIC, Attacker, Bundle, eta_in, queue_topic
from .fleet import VICTIM, VICTIM_INTERVAL, Fleet, settle

pytestmark = pytest.mark.slow

VQ = f"agent.{VICTIM}"
B_TOPICS = (queue_topic(VQ), f"kombu/d/amq.default/{VQ}")
TWO_DAYS = 2 * 86_400.0  # beyond the default max_delay_seconds (one day)


@pytest.fixture
def operator(fleet: Fleet) -> Iterator[Celery]:
    from coordinator.celery_app import make_app

    app = make_app(load_config(data_dir=fleet.data_dir, require_file=True), consumer=False)
    yield app
    close_app(app)


def commands_on_b(observer) -> list[dict]:
    """Commands queued for B. Receipts are left out: the coordinator sends those to B for B's
    own readings (and again as newer checkpoints prove them), not because anyone asked."""
    messages = [json.loads(p) for t, p in observer.received() if t in B_TOPICS]
    return [m for m in messages if m["headers"]["task"] != RECEIPT_TASK]


def test_countdown_beyond_the_allowed_delay_is_refused_at_send_time(fleet: Fleet, operator: Celery) -> None:
    observer = fleet.observer()
    for topic in B_TOPICS:
        assert observer.subscribe(topic) == [1]
    with pytest.raises(SigningError, match="max_delay_seconds"):
        operator.send_task("edge.agent.set_interval", args=[5.5], queue=VQ, countdown=TWO_DAYS, retry=False)
    # nothing was published: a later command reaches B first and finds the old interval
    assert fleet.status_of(VICTIM)["interval"] == VICTIM_INTERVAL
    assert [m["headers"]["task"] for m in commands_on_b(observer)] == ["edge.agent.status"]


def test_command_with_a_far_eta_that_skips_the_send_check_is_refused_by_the_agent(fleet: Fleet) -> None:
    """Defence in depth: a coordinator-signed command with a two-day eta (an older or
    buggy sender) reaches B; B refuses it as eta_too_far instead of parking it."""
    pki = fleet.data_dir / "pki"
    coordinator = Attacker(Bundle(pki, "coordinator", pki / "coordinator.pem", pki / "coordinator.key",
                                  pki / "ca.pem"), fleet.port)
    try:
        msg = coordinator.task("edge.agent.set_interval", args=[5.5], queue=VQ, eta=eta_in(TWO_DAYS))
        tid = msg["headers"]["id"]
        assert coordinator.publish(queue_topic(VQ), msg) == 0
    finally:
        coordinator.close()
    quarantine = fleet.victim.home / "quarantine.sqlite"

    def refused() -> list:
        return [r.reason for r in Quarantine(quarantine).rows() if r.task_id == tid] if quarantine.exists() else []

    settle(fleet, refused, 30, "the far-eta command quarantined by the agent")
    assert refused() == ["eta_too_far"]
    assert fleet.status_of(VICTIM)["interval"] == VICTIM_INTERVAL


def test_countdown_within_the_window_runs_after_the_agent_restarts(fleet: Fleet, operator: Celery) -> None:
    observer = fleet.observer()
    for topic in B_TOPICS:
        assert observer.subscribe(topic) == [1]
    fleet.victim.stop()  # offline: the command waits in B's session
    try:
        result = operator.send_task("edge.agent.status", queue=VQ, countdown=3, retry=False)
        settle(fleet, lambda: commands_on_b(observer), 30, "the delayed command queued for the offline agent")
        assert commands_on_b(observer)[0]["headers"]["eta"], commands_on_b(observer)[0]["headers"]
        fleet.victim.start()
        value = result.get(timeout=120)
    finally:
        if fleet.victim.proc is None:
            fleet.victim.start()
    # run by the restarted agent process (the solo worker runs tasks in its own pid)
    assert (value["agent_id"], value["pid"]) == (VICTIM, fleet.victim.proc.proc.pid)


def test_agent_task_parked_beyond_the_allowed_delay_is_refused(fleet: Fleet) -> None:
    a = fleet.attacker()
    before = fleet.refusals("eta_too_far")
    msg = a.reading_task(5_000_000, eta=eta_in(TWO_DAYS))
    tid = msg["headers"]["id"]
    assert a.publish(INGEST_TOPIC, msg) == 0
    settle(fleet, lambda: fleet.quarantined(tid), 30, "the far-future task quarantined")
    assert [r.reason for r in fleet.quarantined(tid)] == ["eta_too_far"]
    assert fleet.executions(tid) == []
    assert fleet.refusals("eta_too_far") == before + 1
