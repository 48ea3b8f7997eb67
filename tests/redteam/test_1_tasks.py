"""Attacks with task names and canvas fields: an enrolled agent (A) tries to make the
coordinator run something it must not, or to make the coordinator command agent B
for it (confused deputy). Each message is signed by A's real bundle and published raw
to the ingest topic; the expected outcome is a refusal before execution, kept in the
coordinator's quarantine with the shared reason name and counted on /metrics."""

from __future__ import annotations

import json
import uuid

import pytest

from .attacker import INGEST_TOPIC, derived_id, kombu_message, signature
from .fleet import ATTACKER, VICTIM, VICTIM_INTERVAL, Fleet, settle, signed_content

pytestmark = pytest.mark.slow

VICTIM_QUEUE = f"agent.{VICTIM}"


def judge(fleet: Fleet, task_ids: dict[str, str], reason: str, timeout: float = 30) -> str:
    """Wait until every attack message was quarantined or journaled; describe each one
    that did not end as (quarantined with `reason`, no journal row). '' when all did."""
    def outcome() -> dict[str, tuple]:
        found = {}
        for label, tid in task_ids.items():
            rows = fleet.quarantined(tid)
            found[label] = (rows[0].reason if rows else None, fleet.executions(tid))
        return found

    late = ""
    try:
        settle(fleet, lambda: all(q is not None or done for q, done in outcome().values()), timeout,
               f"every attack message refused or executed ({reason})")
    except AssertionError as exc:
        late = f" (still unsettled after {timeout}s: {str(exc)[-1500:]})"
    wrong = {label: state for label, state in outcome().items() if state != (reason, [])}
    return f"expected quarantine reason {reason!r} and no journal row, got {wrong}{late}" if wrong else ""


def refused(fleet: Fleet, task_ids: dict[str, str], reason: str, timeout: float = 30) -> None:
    """Every task id is quarantined with `reason` and none of them was journaled."""
    problem = judge(fleet, task_ids, reason, timeout)
    assert not problem, problem


def test_canvas_in_an_ingest_makes_the_coordinator_command_no_one(fleet: Fleet) -> None:
    """Confused deputy: A's valid reading carries callbacks/errbacks/chain/chord that
    would have the coordinator (signing as itself) call set_interval on B's queue."""
    a = fleet.attacker()
    assert fleet.victim.stored_interval() == VICTIM_INTERVAL
    before = fleet.refusals("canvas_refused")
    evil = {  # a distinct interval per variant, so a leak shows which field did it
        "callbacks": [signature("edge.agent.set_interval", [7.1], queue=VICTIM_QUEUE)],
        "errbacks": [signature("edge.agent.set_interval", [7.2], queue=VICTIM_QUEUE)],
        "chain": [signature("edge.agent.set_interval", [7.3], queue=VICTIM_QUEUE)],
        "chord": signature("edge.agent.set_interval", [7.4], queue=VICTIM_QUEUE),
    }
    ids: dict[str, str] = {}
    base = 1_000_000 + uuid.uuid4().int % 1_000_000  # seqs A has not used
    for offset, (field_name, value) in enumerate(evil.items()):
        # otherwise flawless (A's own reading, id and routing key): only the canvas is wrong
        msg = a.reading_task(base + offset, embed={field_name: value})
        ids[field_name] = msg["headers"]["id"]
        assert a.publish(INGEST_TOPIC, msg) == 0
    problem = judge(fleet, ids, "canvas_refused")
    # B's queue saw nothing from the coordinator: its genuine status (asked after the
    # attack, FIFO behind anything the deputy would have queued) shows the old interval
    status = fleet.status_of(VICTIM)
    assert (status["interval"], fleet.victim.stored_interval()) == (VICTIM_INTERVAL, VICTIM_INTERVAL), (
        f"confused deputy: the coordinator commanded {VICTIM} for {ATTACKER}; {problem}")
    assert fleet.coordinator.query(
        "SELECT COUNT(*) FROM command_results WHERE agent_id = ? AND command = 'edge.agent.set_interval'",
        (VICTIM,)) == [(0,)]
    assert not problem, problem
    assert fleet.refusals("canvas_refused") == before + len(ids)


BUILTINS = {
    "celery.group": {"tasks": [signature("edge.agent.set_interval", [7.5], queue=VICTIM_QUEUE)],
                     "result": [[str(uuid.uuid4()), None], [[[str(uuid.uuid4()), None], None]]],
                     "group_id": str(uuid.uuid4()), "partial_args": []},
    "celery.chain": {},
    "celery.chord": {"header": [signature("edge.agent.set_interval", [7.6], queue=VICTIM_QUEUE)],
                     "body": signature("edge.agent.status", queue=VICTIM_QUEUE)},
    "celery.map": {"task": signature("edge.agent.set_interval", queue=VICTIM_QUEUE), "it": [[7.7]]},
    "celery.starmap": {"task": signature("edge.agent.set_interval", queue=VICTIM_QUEUE), "it": [[7.8]]},
    "celery.chunks": {"task": signature("edge.agent.set_interval", queue=VICTIM_QUEUE), "it": [[7.9]], "n": 1},
    "celery.accumulate": {},
    "celery.backend_cleanup": {},
}


def test_celery_builtins_signed_by_an_agent_are_not_allowed(fleet: Fleet) -> None:
    a = fleet.attacker()
    before = fleet.refusals("task_not_allowed")
    ids = {}
    for name, kwargs in BUILTINS.items():
        msg = a.task(name, kwargs)
        ids[name] = msg["headers"]["id"]
        assert a.publish(INGEST_TOPIC, msg) == 0
    refused(fleet, ids, "task_not_allowed")
    assert fleet.refusals("task_not_allowed") == before + len(ids)
    assert fleet.victim.stored_interval() == VICTIM_INTERVAL


def test_agent_command_tasks_sent_to_the_ingest_queue_are_not_allowed(fleet: Fleet) -> None:
    a = fleet.attacker()
    before = fleet.refusals("task_not_allowed")
    ids = {}
    for name, args in (("edge.agent.set_interval", [9.0]), ("edge.agent.sample_now", []), ("edge.agent.status", [])):
        msg = a.task(name, args=args)
        ids[name] = msg["headers"]["id"]
        assert a.publish(INGEST_TOPIC, msg) == 0
    refused(fleet, ids, "task_not_allowed")
    assert fleet.refusals("task_not_allowed") == before + len(ids)


def test_unknown_task_name_is_quarantined_and_counted(fleet: Fleet) -> None:
    a = fleet.attacker()
    before = fleet.refusals("unknown_task")
    msg = a.task("edge.no_such_task", {"x": 1})
    assert a.publish(INGEST_TOPIC, msg) == 0
    refused(fleet, {"edge.no_such_task": msg["headers"]["id"]}, "unknown_task")
    assert fleet.refusals("unknown_task") == before + 1


def test_messages_that_are_not_tasks_are_quarantined(fleet: Fleet) -> None:
    """A kombu message without a task header, and raw bytes that are no kombu message."""
    a = fleet.attacker()
    since = fleet.last_quarantine_id()
    before = fleet.refusals("not_a_task")
    marker_json, marker_raw = uuid.uuid4().hex.encode(), uuid.uuid4().hex.encode()
    envelope = a.sign("task", None, [[], {"note": marker_json.decode()}, {}])
    headless = kombu_message(envelope, {"note": marker_json.decode()}, "edge.ingest")
    assert a.publish(INGEST_TOPIC, headless) == 0
    assert a.publish(INGEST_TOPIC, b"\x00\xffnot kombu " + marker_raw) == 0

    def rows() -> list:
        return [r for r in fleet.quarantine().rows() if r.id > since
                and (mentions(r, marker_raw) or mentions(r, marker_json))]

    settle(fleet, lambda: len(rows()) >= 2, 30, "both non-tasks quarantined")
    got = rows()
    assert sorted(r.reason for r in got) == ["not_a_task", "not_a_task"], [(r.reason, r.detail) for r in got]
    assert any(r.body.endswith(b"not kombu " + marker_raw) for r in got), "raw bytes not kept as received"
    assert fleet.refusals("not_a_task") == before + 2


def mentions(row, marker: bytes) -> bool:
    """The quarantined message carries `marker`: raw, in its headers, or in its signed payload."""
    if marker in row.body or marker.decode() in json.dumps(row.headers):
        return True
    content = signed_content(row.body)
    return content is not None and marker.decode() in json.dumps(content)


def test_signed_routing_key_must_match_the_queue_it_arrives_on(fleet: Fleet) -> None:
    """A's reading signed for another queue, published to the ingest topic."""
    a = fleet.attacker()
    before = fleet.refusals("routing_key_mismatch")
    seq = 2_000_000 + uuid.uuid4().int % 1_000_000
    ids = {}
    for label, rk, lie in ((VICTIM_QUEUE, VICTIM_QUEUE, False), ("edge.other", "edge.other", False),
                           ("delivery_info lies too", VICTIM_QUEUE, True)):
        msg = a.reading_task(seq, signed_routing_key=rk)
        if lie:  # the kombu properties are the attacker's to write: only the topic is the truth
            msg["properties"]["delivery_info"] = {"exchange": rk, "routing_key": rk}
        seq += 1
        ids[label] = msg["headers"]["id"]
        assert a.publish(INGEST_TOPIC, msg) == 0
    refused(fleet, ids, "routing_key_mismatch")
    assert fleet.refusals("routing_key_mismatch") == before + len(ids)


def test_command_result_for_a_command_never_sent_is_rejected(fleet: Fleet) -> None:
    a = fleet.attacker()
    before = fleet.metric("edgeledger_tasks_refused_total", reason="unknown_command")
    fake_command = str(uuid.uuid4())
    result = {"agent_id": ATTACKER, "command_task_id": fake_command, "command": "edge.agent.status",
              "status": "SUCCESS", "result": {"forged": True}, "finished_at": 1.0}
    msg = a.task("edge.command_result", {"result": result}, task_id=derived_id(ATTACKER, "command_result", fake_command))
    task_id = msg["headers"]["id"]
    assert a.publish(INGEST_TOPIC, msg) == 0
    settle(fleet, lambda: fleet.executions(task_id) or fleet.quarantined(task_id), 45, "the forged result handled")
    assert fleet.executions(task_id) == [("REJECTED", ATTACKER)], fleet.quarantined(task_id)
    assert fleet.coordinator.query("SELECT COUNT(*) FROM command_results WHERE task_id = ?", (task_id,)) == [(0,)]
    assert fleet.metric("edgeledger_tasks_refused_total", reason="unknown_command") == before + 1


def test_command_result_for_a_command_sent_to_the_victim_is_rejected(fleet: Fleet) -> None:
    """A learned the id of a command the operator really sent to B and reports a result
    for it: not A's command, so REJECTED; B's own report is the one that is kept."""
    before = fleet.metric("edgeledger_tasks_refused_total", reason="unknown_command")
    out = fleet.send(VICTIM, "status")
    assert out.returncode == 0, out.stderr
    command_id = json.loads(out.stdout)["task_id"]
    a = fleet.attacker()
    result = {"agent_id": ATTACKER, "command_task_id": command_id, "command": "edge.agent.status",
              "status": "SUCCESS", "result": {"forged": True}, "finished_at": 1.0}
    msg = a.task("edge.command_result", {"result": result}, task_id=derived_id(ATTACKER, "command_result", command_id))
    task_id = msg["headers"]["id"]
    assert a.publish(INGEST_TOPIC, msg) == 0
    settle(fleet, lambda: fleet.executions(task_id) or fleet.quarantined(task_id), 45, "the forged result handled")
    assert fleet.executions(task_id) == [("REJECTED", ATTACKER)], fleet.quarantined(task_id)
    settle(fleet, lambda: fleet.coordinator.query(
        "SELECT agent_id FROM command_results WHERE command_task_id = ?", (command_id,)), 45, "B's own report")
    assert fleet.coordinator.query("SELECT agent_id, status FROM command_results WHERE command_task_id = ?",
                                   (command_id,)) == [(VICTIM, "SUCCESS")]
    assert fleet.metric("edgeledger_tasks_refused_total", reason="unknown_command") == before + 1
