"""The role policy and the execution-time checks through a real in-process worker over
redis: the attacks of issue #9 with real signed messages, and what must still work
(delayed tasks across a worker restart)."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu import Connection, Exchange, Producer, Queue

from security import contract
from security.admission import replay_key
from security.app_signing import ensure_bound, get_verifier, signing_context
from security.policy import coordinator_policy
from security.signing_setup import setup_signing

from .apps import craft, executed, publish_raw, record_run, signing_config
from .test_worker_roundtrip import wait_until


@dataclass
class IngestWorker:
    app: Celery
    queue: str
    side_effects: Path


def ingest_worker(redis_url: str, pki, workdir: Path, queue: str, **cfg) -> IngestWorker:
    """A coordinator-like worker: edge.ingest under the coordinator's role policy."""
    side = workdir / "side-effects.sqlite"
    app = Celery("policy-coord", broker=redis_url, backend="rpc://", set_as_current=False)
    app.conf.update(task_default_queue=queue, worker_hijack_root_logger=False, task_acks_late=True,
                    broker_connection_retry_on_startup=True, worker_enable_remote_control=False)
    setup_signing(app, signing_config(pki, pki.identity("coordinator"), workdir,
                                      policy=coordinator_policy("coordinator"), **cfg))

    @app.task(name=contract.INGEST_TASK, bind=True, shared=False, ignore_result=True)
    def ingest(self, reading: dict) -> dict:
        signer = ensure_bound(self.request.signer, reading["agent_id"])
        record_run(side, contract.INGEST_TASK, signer.agent_id, f"{reading['seq']}:ignore_result={self.request.ignore_result}")
        return {"stored": reading["seq"]}

    return IngestWorker(app=app, queue=queue, side_effects=side)


def reading_msg(ident, seq: int, queue: str, **kw):
    r = {"agent_id": ident.name, "sensor": "temp", "seq": seq, "value": 1.0, "unit": "C", "sampled_at": time.time()}
    return craft(ident, contract.INGEST_TASK, [], kwargs={"reading": r},
                 task_id=contract.reading_task_id(ident.name, seq), routing_key=queue, **kw)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


@pytest.fixture
def worker(redis_url, signing_pki, tmp_path):
    side = ingest_worker(redis_url, signing_pki, tmp_path, f"ingest-{uuid.uuid4().hex[:8]}")
    with start_worker(side.app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        yield side


def test_confused_deputy_publishes_nothing(worker, redis_url, signing_pki):
    """Callbacks on a genuine edge.ingest and direct calls of Celery built-ins would make
    the worker publish follow-up tasks (signed as the coordinator) to agent B's queue."""
    agent = signing_pki.identity("agent-a")
    victim = f"agent.victim-{uuid.uuid4().hex[:6]}"
    follow_up = {"task": "edge.agent.set_interval", "args": [0.05], "kwargs": {}, "options": {"queue": victim},
                 "subtask_type": None, "immutable": True}
    attacks = [
        ("canvas_refused", *reading_msg(agent, 1, worker.queue, embed={"callbacks": [follow_up]})),
        ("canvas_refused", *reading_msg(agent, 2, worker.queue, embed={"chain": [follow_up]})),
        ("task_not_allowed", *craft(agent, "celery.group", [], routing_key=worker.queue, kwargs={
            "tasks": [follow_up], "result": [["g-1", None], None], "group_id": "g-1", "partial_args": []})),
        ("task_not_allowed", *craft(agent, "celery.chain", [], kwargs={"tasks": [follow_up]}, routing_key=worker.queue)),
    ]
    quarantine = get_verifier(worker.app).quarantine
    before = {r: quarantine.count(r) for r in ("canvas_refused", "task_not_allowed")}
    for _reason, headers, body in attacks:
        publish_raw(redis_url, worker.queue, headers, body)
    publish_raw(redis_url, worker.queue, *reading_msg(agent, 3, worker.queue))  # sentinel (solo pool: in order)
    wait_until(lambda: any(value.startswith("3:") for _t, _a, value in executed(worker.side_effects)))
    r = redis.Redis.from_url(redis_url)
    assert r.llen(victim) == 0, "the worker published a follow-up task"
    assert executed(worker.side_effects) == [(contract.INGEST_TASK, "agent-a", "3:ignore_result=True")]
    assert quarantine.count("canvas_refused") == before["canvas_refused"] + 2
    assert quarantine.count("task_not_allowed") == before["task_not_allowed"] + 2
    wait_until(lambda: r.llen(worker.queue) == 0 and not r.hlen("unacked"))  # refusals acked


def test_refusals_celery_would_only_log_are_quarantined(worker, redis_url, signing_pki):
    agent = signing_pki.identity("agent-a")
    quarantine = get_verifier(worker.app).quarantine
    reasons = ("unknown_task", "not_a_task", "routing_key_mismatch", "id_not_bound", "task_not_allowed")
    before = {r: quarantine.count(r) for r in reasons}
    unknown_headers, unknown_body = craft(agent, "t.not_registered", ["x"], routing_key=worker.queue)
    publish_raw(redis_url, worker.queue, unknown_headers, unknown_body)
    # an agent command sent to the ingest queue: not registered here, and a task of another role
    command_headers, command_body = craft(agent, "edge.agent.set_interval", [9.0], routing_key=worker.queue)
    publish_raw(redis_url, worker.queue, command_headers, command_body)
    not_a_task = json.dumps({"hello": "world"}).encode()
    publish_raw(redis_url, worker.queue, {}, not_a_task, content_type="application/json")
    publish_raw(redis_url, worker.queue, *reading_msg(agent, 10, "agent.agent-b"))  # signed for another queue
    own_reading = {"agent_id": "agent-a", "sensor": "t", "seq": 11, "value": 1.0, "unit": "C", "sampled_at": 1.0}
    squat_headers, squat_body = craft(agent, contract.INGEST_TASK, [], routing_key=worker.queue,
                                      kwargs={"reading": own_reading},
                                      task_id=contract.reading_task_id("agent-b", 11))  # B's id, A's reading
    publish_raw(redis_url, worker.queue, squat_headers, squat_body)
    publish_raw(redis_url, worker.queue, *reading_msg(agent, 12, worker.queue))  # sentinel
    wait_until(lambda: executed(worker.side_effects))
    assert executed(worker.side_effects) == [(contract.INGEST_TASK, "agent-a", "12:ignore_result=True")]
    wait_until(lambda: all(quarantine.count(r) == before[r] + 1 for r in reasons))
    assert quarantine.rows("unknown_task")[-1].body == unknown_body
    assert quarantine.rows("unknown_task")[-1].task_name == "t.not_registered"
    assert quarantine.rows("not_a_task")[-1].body == not_a_task
    assert quarantine.rows("task_not_allowed")[-1].task_name == "edge.agent.set_interval"
    r = redis.Redis.from_url(redis_url)
    wait_until(lambda: r.llen(worker.queue) == 0 and not r.hlen("unacked"))


def test_an_ignore_result_header_cannot_turn_results_on(worker, redis_url, signing_pki):
    """`ignore_result: false` + reply_to would make the worker publish a result wherever
    the sender chose; the task's own ignore_result wins."""
    agent = signing_pki.identity("agent-a")
    headers, body = reading_msg(agent, 20, worker.queue, headers_override={"ignore_result": False})
    with Connection(redis_url) as conn:  # with a reply_to property, as an attacker would send it
        q = Queue(worker.queue, Exchange(worker.queue), routing_key=worker.queue)
        Producer(conn.channel()).publish(body, exchange=q.exchange, routing_key=worker.queue, declare=[q],
                                         headers=headers, content_type="application/x-edge-signed",
                                         content_encoding="binary", serializer=None, reply_to="spy-replies",
                                         correlation_id=headers["id"])
    wait_until(lambda: executed(worker.side_effects))
    assert executed(worker.side_effects) == [(contract.INGEST_TASK, "agent-a", "20:ignore_result=True")]


def test_an_eta_task_of_a_signer_revoked_meanwhile_never_runs(worker, redis_url, signing_pki):
    late = signing_pki.issue("agent-late")
    headers, body = reading_msg(late, 1, worker.queue, headers_override={"eta": _iso(time.time() + 10)})
    ctx = signing_context(worker.app)
    quarantine = ctx.verifier.quarantine
    before = quarantine.count("cert_revoked")
    publish_raw(redis_url, worker.queue, headers, body)
    wait_until(lambda: ctx.guard.seen(replay_key("agent-late", headers["id"], 0)))  # accepted, waiting for its eta
    signing_pki.revoke(late)  # what `edge-coordinator revoke` does to the CRL file
    wait_until(lambda: quarantine.count("cert_revoked") == before + 1, timeout=60)
    row = quarantine.rows("cert_revoked")[-1]
    assert row.task_id == headers["id"] and row.signer == "agent-late" and "before execution" in row.detail
    assert executed(worker.side_effects) == []
    r = redis.Redis.from_url(redis_url)
    wait_until(lambda: r.llen(worker.queue) == 0 and not r.hlen("unacked"))  # acked, not redelivered


def test_a_delayed_task_survives_a_worker_restart(redis_url, signing_pki, tmp_path):
    """A task signed longer than max_age ago for a later eta is fresh (freshness runs from
    the eta); redelivered after a worker restart it is accepted again and runs once."""
    queue = f"ingest-{uuid.uuid4().hex[:8]}"
    agent = signing_pki.identity("agent-a")
    now = time.time()
    headers, body = reading_msg(agent, 30, queue, sent_at=now - 20, headers_override={"eta": _iso(now + 12)})
    first = ingest_worker(redis_url, signing_pki, tmp_path, queue, max_age_seconds=10)
    with start_worker(first.app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        publish_raw(redis_url, queue, headers, body)
        wait_until(lambda: signing_context(first.app).guard.seen(replay_key("agent-a", headers["id"], 0)))
    assert executed(first.side_effects) == []  # stopped while the task waited for its eta
    second = ingest_worker(redis_url, signing_pki, tmp_path, queue, max_age_seconds=10)  # a new process's state
    quarantine = get_verifier(second.app).quarantine
    with start_worker(second.app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        wait_until(lambda: executed(second.side_effects), timeout=60)
    assert executed(second.side_effects) == [(contract.INGEST_TASK, "agent-a", "30:ignore_result=True")]
    assert [row.reason for row in quarantine.rows() if row.task_id == headers["id"]] == []
