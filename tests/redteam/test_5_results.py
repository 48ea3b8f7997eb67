"""Attacks on rpc:// results: agent A answers a command that was sent to agent B
(A may publish into the reply subtree `kombu/d/c.rep/+`), or replays B's genuine
result. The caller must keep only B's genuine result and quarantine the rest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coordinator.config import load_config
from security.metrics import REFUSALS
from security.quarantine import QuarantinedMessage
from tests.coordinator.support import ROOT
from tests.support.celery_apps import close_app

from .attacker import decode_message, queue_topic, reply_topic
from .fleet import VICTIM, Fleet, settle, signed_content

pytestmark = pytest.mark.slow

VQ = f"agent.{VICTIM}"


def about(row: QuarantinedMessage, task_id: str) -> bool:
    """The quarantined result concerns `task_id` (by its row, or by its signed body)."""
    if row.task_id == task_id:
        return True
    content = signed_content(row.body)
    body = content.get("body") if content else None
    return isinstance(body, dict) and body.get("task_id") == task_id


B_TOPICS = (queue_topic(VQ), f"kombu/d/amq.default/{VQ}")  # Celery sends commands via either


def commands_seen(observer, task: str) -> list[dict]:
    out = []
    for topic, payload in observer.received():
        if topic not in B_TOPICS:
            continue
        message = json.loads(payload)
        if message.get("headers", {}).get("task") == task:
            out.append(message)
    return out


def test_forged_result_from_another_agent_is_refused_and_the_genuine_one_kept(fleet: Fleet) -> None:
    observer = fleet.observer()
    for topic in B_TOPICS:  # a copy of what is sent to B (the test's eyes only)
        assert observer.subscribe(topic) == [1]
    a = fleet.attacker()
    fleet.victim.stop()  # B is offline: its command waits in its session, the window A races in
    caller = None
    try:
        caller = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "send", "--data-dir", str(fleet.data_dir), VICTIM, "status",
             "--timeout", "120", "--json"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        settle(fleet, lambda: commands_seen(observer, "edge.agent.status"), 60, "the operator's command on B's queue")
        command = commands_seen(observer, "edge.agent.status")[0]
        task_id, reply_to = command["headers"]["id"], command["properties"]["reply_to"]
        forged = a.result(task_id, {"agent_id": VICTIM, "interval": 99.0, "forged": True})
        assert a.publish(reply_topic(reply_to), forged) == 0
        fleet.victim.start()
        out, err = caller.communicate(timeout=180)
    finally:
        if caller is not None and caller.poll() is None:
            caller.kill()
            caller.communicate()
        if fleet.victim.proc is None:
            fleet.victim.start()
    assert caller.returncode == 0, err
    reply = json.loads(out)
    assert reply["task_id"] == task_id and reply["status"] == "SUCCESS"
    assert "forged" not in reply["result"], f"the caller took the attacker's result: {reply['result']}"
    assert reply["result"]["agent_id"] == VICTIM and "pid" in reply["result"]
    rows = [r for r in fleet.quarantine().rows("result_unbound") if about(r, task_id)]
    assert len(rows) == 1 and rows[0].signer in (None, a.agent_id), rows


def test_replayed_genuine_result_is_refused(fleet: Fleet) -> None:
    """The same caller receives B's genuine result for T twice: the second is a replay."""
    from coordinator.celery_app import make_app

    observer = fleet.observer()
    app = make_app(load_config(data_dir=fleet.data_dir, require_file=True), consumer=False)
    try:
        counted = REFUSALS.get("result_replay")  # the caller is this process: its own counter
        reply_to = app.thread_oid
        assert observer.subscribe(reply_topic(reply_to)) == [1]
        first = app.send_task("edge.agent.status", queue=VQ, retry=False)
        value = first.get(timeout=60)
        assert value["agent_id"] == VICTIM
        settle(fleet, lambda: observer.received(reply_topic(reply_to)), 30, "B's genuine result captured")
        genuine = observer.received(reply_topic(reply_to))[0][1]
        _, signed = decode_message(genuine)
        assert signed["body"]["task_id"] == first.id
        # anyone who saw it (here: A, allowed to publish replies) sends it again
        a = fleet.attacker()
        assert a.publish(reply_topic(reply_to), genuine) == 0
        second = app.send_task("edge.agent.status", queue=VQ, retry=False)  # the caller reads on
        assert second.get(timeout=60)["agent_id"] == VICTIM
        settle(fleet, lambda: len(observer.received(reply_topic(reply_to))) == 3, 30,
               "genuine result, its replay and the second result all on the caller's reply topic")
        settle(fleet, lambda: [r for r in fleet.quarantine().rows("result_replay") if about(r, first.id)], 30,
               "the replayed result quarantined as result_replay")
        assert len([r for r in fleet.quarantine().rows("result_replay") if about(r, first.id)]) == 1
        assert first.result == value
        assert REFUSALS.get("result_replay") == counted + 1
    finally:
        close_app(app)
