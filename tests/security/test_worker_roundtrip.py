"""Signed tasks and signed results through a real in-process worker over redis."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from celery.contrib.testing.worker import start_worker

from security.app_signing import get_verifier
from security.pki import fingerprint, load_certificate

from .apps import craft, executed, make_sender_app, make_worker_app, publish_raw


def wait_until(pred, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def worker_side(redis_url, signing_pki, tmp_path: Path):
    side = make_worker_app(redis_url, signing_pki, tmp_path)
    with start_worker(side.app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        yield side


def test_signed_task_runs_and_signed_result_returns(worker_side, redis_url, signing_pki, tmp_path):
    from security import metrics

    agent = signing_pki.identity("agent-a")
    sender = make_sender_app(redis_url, signing_pki, agent, tmp_path, worker_side.queue)
    crypto_checks = metrics.ACCEPTED.get("task")
    result = sender.send_task("t.record", args=["agent-a", "42"])
    got = result.get(timeout=30)
    # the consumer verified it, the execution path decoded it again: the crypto ran once
    assert metrics.ACCEPTED.get("task") == crypto_checks + 1
    assert got["agent_id"] == "agent-a"
    assert got["fingerprint"] == fingerprint(load_certificate(agent.cert))
    assert len(got["envelope_digest"]) == 64
    assert executed(worker_side.side_effects) == [("t.record", "agent-a", "42")]


def test_agent_signing_as_another_agent_is_refused(worker_side, redis_url, signing_pki, tmp_path):
    quarantine = get_verifier(worker_side.app).quarantine
    before = quarantine.count("identity_mismatch")
    sender = make_sender_app(redis_url, signing_pki, signing_pki.identity("agent-a"), tmp_path, worker_side.queue)
    result = sender.send_task("t.record", args=["agent-b", "stolen"])
    with pytest.raises(Exception, match="identity_mismatch"):
        result.get(timeout=30)
    assert executed(worker_side.side_effects) == []
    assert quarantine.count("identity_mismatch") == before + 1


def test_replayed_message_runs_once(worker_side, redis_url, signing_pki):
    agent = signing_pki.identity("agent-a")
    headers, body = craft(agent, "t.other", ["agent-a", "once"], routing_key=worker_side.queue)
    publish_raw(redis_url, worker_side.queue, headers, body)
    wait_until(lambda: executed(worker_side.side_effects))
    quarantine = get_verifier(worker_side.app).quarantine
    before = quarantine.count("replay")
    publish_raw(redis_url, worker_side.queue, headers, body)
    wait_until(lambda: quarantine.count("replay") == before + 1)
    assert executed(worker_side.side_effects) == [("t.other", "agent-a", "once")]


def test_bad_messages_through_the_worker_are_refused_and_quarantined(worker_side, redis_url, signing_pki, tmp_path):
    """A representative subset of the matrix over a real broker and worker: nothing runs."""
    import base64
    import datetime as dt
    import json

    from security.pki import CertificateAuthority, utcnow

    agent = signing_pki.identity("agent-a")
    cases: list[tuple[str, dict, bytes, str]] = []
    rk = worker_side.queue  # the queue the messages are signed for

    headers, body = craft(agent, "t.other", ["agent-a", "tampered"], routing_key=rk)
    doc = json.loads(body)
    payload = bytearray(base64.b64decode(doc["payload"]))
    payload[10] ^= 1
    doc["payload"] = base64.b64encode(bytes(payload)).decode()
    cases.append(("bad_signature", headers, json.dumps(doc, separators=(",", ":")).encode(), "tampered"))

    rogue = signing_pki.issue("agent-a", ca=CertificateAuthority.create("rogue"))
    cases.append(("cert_untrusted", *craft(rogue, "t.other", ["agent-a", "rogue"], routing_key=rk), "rogue"))

    expired = signing_pki.issue("agent-exp", not_before=utcnow() - dt.timedelta(days=5),
                                not_after=utcnow() - dt.timedelta(days=1))
    cases.append(("cert_expired", *craft(expired, "t.other", ["agent-exp", "expired"], routing_key=rk), "expired"))

    revoked = signing_pki.issue("agent-rev")
    signing_pki.revoke(revoked)
    cases.append(("cert_revoked", *craft(revoked, "t.other", ["agent-rev", "revoked"], routing_key=rk), "revoked"))

    headers, body = craft(agent, "t.record", ["agent-a", "swapped"], routing_key=rk)
    cases.append(("header_mismatch", dict(headers, task="t.other"), body, "swapped"))

    headers, body = craft(agent, "t.other", ["agent-a", "stale"], sent_at=time.time() - 3600, routing_key=rk)
    cases.append(("stale", headers, body, "stale"))

    headers, body = craft(agent, "t.other", ["agent-a", "x" * 300_000], routing_key=rk)
    cases.append(("oversize", headers, body, "oversize"))

    headers, _ = craft(agent, "t.other", ["agent-a", "malformed"], routing_key=rk)
    cases.append(("malformed", headers, b"{this is not json", "malformed"))

    quarantine = get_verifier(worker_side.app).quarantine
    before = {reason: quarantine.count(reason) for reason, *_ in cases}
    for _reason, headers, body, _label in cases:
        publish_raw(redis_url, worker_side.queue, headers, body)
    sentinel_headers, sentinel_body = craft(agent, "t.other", ["agent-a", "sentinel"], routing_key=rk)
    publish_raw(redis_url, worker_side.queue, sentinel_headers, sentinel_body)

    wait_until(lambda: executed(worker_side.side_effects))  # solo pool: in order, so all were seen
    assert executed(worker_side.side_effects) == [("t.other", "agent-a", "sentinel")]
    for reason, *_ in cases:
        assert quarantine.count(reason) == before[reason] + 1, reason
    # refused messages were acked (kept in quarantine), not left to be redelivered
    import redis

    r = redis.Redis.from_url(redis_url)
    wait_until(lambda: r.llen(worker_side.queue) == 0 and r.hlen("unacked") == 0)
