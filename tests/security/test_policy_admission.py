"""The role policy, id binding, routing key, eta limits and verdict cache through real
signed messages at the admission level (admit(), no broker): every refusal is
counted, quarantined raw and never becomes a runnable task."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from celery import Celery

from security import contract, metrics
from security.admission import Delivery
from security.app_signing import admit, get_verifier, signing_context
from security.codec import CONTENT_TYPE
from security.policy import agent_policy, coordinator_policy
from security.signing import SignatureRefused, SigningError
from security.signing_setup import setup_signing

from .apps import craft, signing_config

INGEST = contract.INGEST_QUEUE
ON_INGEST = Delivery(routing_key=INGEST, queues=frozenset({INGEST}))


@pytest.fixture
def coordinator(signing_pki, tmp_path: Path) -> Celery:
    """The coordinator's role policy, here letting agents delay tasks by up to an hour
    (the default allows 300 s) to test the eta rules of the signing layer."""
    app = Celery("coordinator-policy", broker="memory://", set_as_current=False)
    setup_signing(app, signing_config(signing_pki, signing_pki.identity("coordinator"), tmp_path,
                                      policy=coordinator_policy("coordinator", agent_max_delay=3600),
                                      max_age_seconds=60, max_delay_seconds=7200))
    return app


def reading(agent: str, seq: int) -> dict:
    return {"agent_id": agent, "sensor": "temp", "seq": seq, "value": 20.5, "unit": "C", "sampled_at": time.time()}


def ingest_msg(pki, agent: str, seq: int, *, task_id: str | None = None, routing_key: str = INGEST, **kw):
    return craft(pki.identity(agent), contract.INGEST_TASK, [], kwargs={"reading": reading(agent, seq)},
                 task_id=task_id or contract.reading_task_id(agent, seq), routing_key=routing_key, **kw)


def refused(app: Celery, headers: dict, body: bytes, reason: str, delivery: Delivery | None = ON_INGEST) -> None:
    quarantine = get_verifier(app).quarantine
    before_q, before_m = quarantine.count(reason), metrics.REFUSALS.get(reason)
    assert admit(app, headers, body, CONTENT_TYPE, delivery) is None
    assert quarantine.count(reason) == before_q + 1, f"not quarantined as {reason}"
    assert metrics.REFUSALS.get(reason) == before_m + 1, f"not counted as {reason}"
    row = quarantine.rows(reason)[-1]
    assert row.body == body and row.task_id == headers["id"]


def test_a_genuine_agent_reading_is_admitted(coordinator, signing_pki):
    headers, body = ingest_msg(signing_pki, "agent-a", 1)
    vm = admit(coordinator, headers, body, CONTENT_TYPE, ON_INGEST)
    assert vm is not None and vm.signer.agent_id == "agent-a"


@pytest.mark.parametrize("field", ["callbacks", "errbacks", "chain", "chord", "link", "link_error"])
def test_confused_deputy_callbacks_are_refused(coordinator, signing_pki, field):
    """A genuine edge.ingest carrying a follow-up task for agent B's queue."""
    follow_up = {"task": "edge.agent.set_interval", "args": [0.05], "kwargs": {},
                 "options": {"queue": "agent.agent-b"}, "subtask_type": None, "immutable": True}
    headers, body = ingest_msg(signing_pki, "agent-a", 2, embed={field: [follow_up]})
    refused(coordinator, headers, body, "canvas_refused")


@pytest.mark.parametrize("name", ["celery.group", "celery.chain", "celery.chord", "celery.map", "celery.starmap",
                                  "celery.chunks", "celery.backend_cleanup", "celery.accumulate",
                                  "celery.chord_unlock"])
def test_celery_builtins_are_refused(coordinator, signing_pki, name):
    headers, body = craft(signing_pki.identity("agent-a"), name, [], routing_key=INGEST)
    refused(coordinator, headers, body, "task_not_allowed")


def test_an_agent_may_not_call_agent_commands_on_the_coordinator(coordinator, signing_pki):
    headers, body = craft(signing_pki.identity("agent-a"), "edge.agent.set_interval", [1], routing_key=INGEST)
    refused(coordinator, headers, body, "task_not_allowed")


def test_group_header_is_refused(coordinator, signing_pki):
    headers, body = ingest_msg(signing_pki, "agent-a", 3)
    # the group header is not signed: a relay cannot add one either
    refused(coordinator, dict(headers, group="g-1"), body, "canvas_refused")


def test_embed_fields_that_would_override_the_request_are_refused(coordinator, signing_pki):
    headers, body = ingest_msg(signing_pki, "agent-a", 4, embed={"reply_to": "agent.agent-b", "ignore_result": False})
    refused(coordinator, headers, body, "malformed")


def test_task_id_squatting_is_refused_and_the_victims_reading_still_admitted(coordinator, signing_pki):
    """A sends its own valid reading under B's next id: refused, and B's real reading
    with that id is neither a replay nor a duplicate."""
    victim_id = contract.reading_task_id("agent-b", 77)
    headers, body = ingest_msg(signing_pki, "agent-a", 77, task_id=victim_id)
    refused(coordinator, headers, body, "id_not_bound")
    headers, body = ingest_msg(signing_pki, "agent-b", 77)
    assert headers["id"] == victim_id
    assert admit(coordinator, headers, body, CONTENT_TYPE, ON_INGEST).signer.agent_id == "agent-b"


def test_replay_guard_is_keyed_by_signer(signing_pki, tmp_path):
    """Even where ids are free-form (no id binding), one signer's id never blocks another's."""
    app = Celery("free-ids", broker="memory://", set_as_current=False)
    setup_signing(app, signing_config(signing_pki, signing_pki.identity("coordinator"), tmp_path))
    h_a, b_a = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "1"], task_id="shared-id")
    h_b, b_b = craft(signing_pki.identity("agent-b"), "t.record", ["agent-b", "1"], task_id="shared-id")
    assert admit(app, h_a, b_a, CONTENT_TYPE) is not None
    assert admit(app, h_b, b_b, CONTENT_TYPE) is not None
    refused(app, h_a, b_a, "replay", delivery=None)


def test_routing_key_must_match_the_delivery_and_a_consumed_queue(coordinator, signing_pki):
    headers, body = ingest_msg(signing_pki, "agent-a", 5, routing_key="agent.agent-b")
    refused(coordinator, headers, body, "routing_key_mismatch",
            Delivery(routing_key=INGEST, queues=frozenset({INGEST})))
    headers, body = ingest_msg(signing_pki, "agent-a", 6, routing_key="agent.agent-b")
    refused(coordinator, headers, body, "routing_key_mismatch",  # delivery info is the sender's word: not enough
            Delivery(routing_key="agent.agent-b", queues=frozenset({INGEST})))
    headers, body = craft(signing_pki.identity("agent-a"), contract.INGEST_TASK, [],
                          kwargs={"reading": reading("agent-a", 7)}, task_id=contract.reading_task_id("agent-a", 7))
    refused(coordinator, headers, body, "routing_key_mismatch")  # signed without a routing key


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def test_a_delayed_task_is_fresh_until_its_eta_plus_max_age(coordinator, signing_pki):
    """Sent 10 minutes ago (max_age 60 s) for an eta 20 minutes from then: still fresh."""
    sent = time.time() - 600
    headers, body = ingest_msg(signing_pki, "agent-a", 8, sent_at=sent, headers_override={"eta": _iso(sent + 1200)})
    assert admit(coordinator, headers, body, CONTENT_TYPE, ON_INGEST) is not None
    # the replay guard keeps the id for as long as the message could be fresh
    row = signing_context(coordinator).guard._conn().execute(
        "select fresh_until from seen where key like ?", (f"agent-a/{headers['id']}:%",)).fetchone()
    assert row[0] == pytest.approx(sent + 1200 + 60)
    # a task whose eta + max_age passed is stale
    headers, body = ingest_msg(signing_pki, "agent-a", 9, sent_at=sent, headers_override={"eta": _iso(sent + 30)})
    refused(coordinator, headers, body, "stale")


def test_an_eta_beyond_max_delay_is_refused_on_receipt(coordinator, signing_pki):
    headers, body = ingest_msg(signing_pki, "agent-a", 10, headers_override={"eta": _iso(time.time() + 9000)})
    refused(coordinator, headers, body, "eta_too_far")
    assert "max_delay_seconds=7200" in get_verifier(coordinator).quarantine.rows("eta_too_far")[-1].detail


def test_an_agent_may_not_park_tasks_at_the_coordinator(coordinator, signing_pki, tmp_path):
    """Within max_delay_seconds, but beyond what the role policy lets an agent delay."""
    headers, body = ingest_msg(signing_pki, "agent-a", 11, headers_override={"eta": _iso(time.time() + 5400)})
    refused(coordinator, headers, body, "eta_too_far")
    assert "at most 3600s" in get_verifier(coordinator).quarantine.rows("eta_too_far")[-1].detail


def test_an_eta_beyond_max_delay_is_refused_at_send_time(signing_pki, tmp_path):
    sender = Celery("eta-sender", broker="memory://", set_as_current=False)
    sender.conf.task_default_queue = "eta-limit-test"
    setup_signing(sender, signing_config(signing_pki, signing_pki.identity("agent-a"), tmp_path, max_delay_seconds=60))
    with pytest.raises(SigningError, match=r"max_delay_seconds=60.*eta_too_far.*Schedule it at most 60s"):
        sender.send_task("t.record", args=["agent-a", "late"], countdown=3600)
    with pytest.raises(SigningError, match="max_delay_seconds=60"):
        sender.send_task("t.record", args=["agent-a", "late"], eta=dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    sender.send_task("t.record", args=["agent-a", "soon"], countdown=30)  # within the limit: sent


def test_the_verdict_cache_does_not_outlive_a_crl_change(coordinator, signing_pki):
    victim = signing_pki.issue("agent-cache")
    headers, body = ingest_msg_for(victim, 1)
    verifier = get_verifier(coordinator)
    assert verifier.verify(body).signer.agent_id == "agent-cache"  # verdict cached
    signing_pki.revoke(victim)
    with pytest.raises(SignatureRefused, match="cert_revoked"):
        verifier.verify(body)  # the same bytes again, within the cache lifetime


def ingest_msg_for(ident, seq: int):
    r = {"agent_id": ident.name, "sensor": "temp", "seq": seq, "value": 1.0, "unit": "C", "sampled_at": time.time()}
    return craft(ident, contract.INGEST_TASK, [], kwargs={"reading": r},
                 task_id=contract.reading_task_id(ident.name, seq), routing_key=INGEST)


def test_agent_side_policy(signing_pki, tmp_path):
    agent = Celery("agent-policy", broker="memory://", set_as_current=False)
    setup_signing(agent, signing_config(signing_pki, signing_pki.identity("agent-a"), tmp_path,
                                        policy=agent_policy(["coordinator"])))
    own = Delivery(routing_key="agent.agent-a", queues=frozenset({"agent.agent-a"}))
    coord = signing_pki.identity("coordinator")
    headers, body = craft(coord, "edge.agent.status", [], routing_key="agent.agent-a")
    assert admit(agent, headers, body, CONTENT_TYPE, own) is not None
    headers, body = craft(signing_pki.identity("agent-b"), "edge.agent.status", [], routing_key="agent.agent-a")
    refused(agent, headers, body, "signer_not_allowed", own)
    headers, body = craft(coord, "celery.backend_cleanup", [], routing_key="agent.agent-a")
    refused(agent, headers, body, "task_not_allowed", own)
    headers, body = craft(coord, "edge.agent.set_interval", [1], routing_key="agent.agent-a",
                          embed={"callbacks": [{"task": "edge.agent.status", "options": {"queue": "agent.agent-b"}}]})
    refused(agent, headers, body, "canvas_refused", own)
    headers, body = craft(coord, "edge.agent.status", [], routing_key="agent.agent-b")  # meant for agent B
    refused(agent, headers, body, "routing_key_mismatch", Delivery(routing_key="agent.agent-b",
                                                                    queues=frozenset({"agent.agent-a"})))


def test_the_transports_dead_letters_are_quarantined(coordinator):
    """kombu_mqtt hands payloads that are not kombu messages to `dead_letter_handler`
    (before acking them): setup_signing points it at the app's quarantine."""
    handler = coordinator.conf.broker_transport_options["dead_letter_handler"]
    quarantine = get_verifier(coordinator).quarantine
    before, counted = quarantine.count("not_a_task"), metrics.REFUSALS.get("not_a_task")
    handler("edge.ingest", "kombu/d/edge.ingest/edge.ingest", b"\x00\xffnot kombu", "not_a_kombu_message")
    assert quarantine.count("not_a_task") == before + 1 and metrics.REFUSALS.get("not_a_task") == counted + 1
    row = quarantine.rows("not_a_task")[-1]
    assert row.body == b"\x00\xffnot kombu" and "edge.ingest" in row.detail
    handler("kombu/d/x/x", "kombu/d/x/x", b"{}", "stale_subscription")
    assert quarantine.rows("stale_subscription")[-1].body == b"{}"


def test_a_transport_dead_letter_handler_set_by_the_app_is_kept(signing_pki, tmp_path):
    app = Celery("own-handler", broker="memory://", set_as_current=False)
    app.conf.broker_transport_options = {"dead_letter_handler": "my.module:handler", "keepalive": 6}
    setup_signing(app, signing_config(signing_pki, signing_pki.identity("coordinator"), tmp_path))
    assert app.conf.broker_transport_options == {"dead_letter_handler": "my.module:handler", "keepalive": 6}


@pytest.fixture
def resending_coordinator(signing_pki, tmp_path: Path) -> Celery:
    """The coordinator's real admission settings for agents' re-sendable tasks (max_age 60 s here)."""
    app = Celery("coordinator-resend", broker="memory://", set_as_current=False)
    setup_signing(app, signing_config(signing_pki, signing_pki.identity("coordinator"), tmp_path,
                                      policy=coordinator_policy("coordinator"), max_age_seconds=60,
                                      resend_tasks=contract.RESENDABLE_TASKS, resend_max_age_seconds=3600))
    return app


def test_a_reading_older_than_max_age_from_a_broker_backlog_is_stored_not_refused(resending_coordinator, signing_pki):
    """A coordinator down or behind for longer than max_age finds its backlog old: the
    readings in it are idempotent (the journal dedupes by task id), so they pass up to
    resend_max_age; past that they are stale like anything else."""
    old = time.time() - 600
    headers, body = ingest_msg(signing_pki, "agent-a", 20, sent_at=old)
    assert admit(resending_coordinator, headers, body, CONTENT_TYPE, ON_INGEST) is not None
    headers, body = ingest_msg(signing_pki, "agent-a", 21, sent_at=time.time() - 7200)
    refused(resending_coordinator, headers, body, "stale")


def test_an_old_message_claiming_a_resendable_task_name_in_its_headers_is_refused(resending_coordinator, signing_pki):
    """The longer bound is chosen by the header's task name, which is unsigned: a message
    signed as another task is refused (header_mismatch), never admitted as fresh."""
    headers, body = craft(signing_pki.identity("agent-a"), "edge.other", [], routing_key=INGEST,
                          sent_at=time.time() - 600, task_id=contract.reading_task_id("agent-a", 22))
    headers["task"] = contract.INGEST_TASK
    refused(resending_coordinator, headers, body, "header_mismatch")


def test_commands_keep_the_short_freshness_bound(resending_coordinator, signing_pki):
    """Only the re-sendable (idempotent) tasks get the longer bound: anything else older
    than max_age is stale."""
    headers, body = craft(signing_pki.identity("agent-a"), "edge.other", [], routing_key=INGEST,
                          sent_at=time.time() - 600)
    refused(resending_coordinator, headers, body, "stale")
