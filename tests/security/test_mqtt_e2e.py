"""End to end over the real fleet broker: Mosquitto from our renderer (mutual TLS,
ACLs, CRL), kombu_mqtt, in-process Celery workers, signed tasks and signed results."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu.exceptions import OperationalError

import kombu_mqtt
from security.app_signing import ensure_bound, get_verifier
from security.signing_setup import setup_signing

from .apps import executed, record_run, signing_config
from .broker import fleet_broker
from .test_worker_roundtrip import wait_until


@pytest.fixture(scope="module", params=["file", "dynsec"])
def broker(request, signing_pki, tmp_path_factory):
    """The fleet broker in both ACL modes: everything below must work the same."""
    fleet = signing_pki.fleet
    b = fleet_broker(tmp_path_factory.mktemp(f"e2e-broker-{request.param}"), fleet.ca_path, fleet.server_cert,
                     fleet.server_key, signing_pki.crl_path, acl_mode=request.param, agent_ids=("agent-a", "agent-b"))
    yield b
    b.stop()


def mqtt_app(name: str, broker, signing_pki, ident_name: str, workdir: Path, queue: str, **signing) -> Celery:
    ident = signing_pki.identity(ident_name)
    app = Celery(name, broker=broker.url, backend="rpc://", set_as_current=False)
    app.conf.update(
        broker_use_ssl={"ca_certs": str(signing_pki.ca_path), "certfile": str(ident.cert), "keyfile": str(ident.key)},
        # One stable consuming client id per (identity, queue), as in production: a later
        # worker resumes the session instead of leaving an offline member in the shared
        # group (which would take its turn of the messages). Short keepalive: the
        # event-driven worker loop wakes often enough to stop quickly in tests.
        broker_transport_options={"client_id": f"sectest-{ident_name}-{queue}", "keepalive": 3,
                                  "session_expiry": 60},
        task_default_queue=queue, task_acks_late=True, worker_prefetch_multiplier=1,
        worker_enable_remote_control=False, worker_send_task_events=False, task_send_sent_event=False,
        worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
    )
    setup_signing(app, signing_config(signing_pki, ident, workdir, **signing))
    return app


def send_when_subscribed(app: Celery, *args, **kwargs):
    """Retry while the just-started worker's subscription is not in place yet
    (the transport refuses to publish into a topic nobody subscribes to)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return app.send_task(*args, **kwargs)
        except kombu_mqtt.NoSubscribersError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_agent_task_to_coordinator_over_mqtts(broker, signing_pki, tmp_path):
    side = tmp_path / "coordinator.sqlite"
    coord = mqtt_app("coord", broker, signing_pki, "coordinator", tmp_path / "c", "edge.ingest")

    @coord.task(name="t.ingest", bind=True, shared=False)
    def ingest(self, reading: dict) -> None:
        signer = ensure_bound(self.request.signer, reading["agent_id"])
        record_run(side, "t.ingest", signer.agent_id, str(reading["value"]))

    agent = mqtt_app("agent", broker, signing_pki, "agent-a", tmp_path / "a", "edge.ingest")
    with start_worker(coord, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        send_when_subscribed(agent, "t.ingest", kwargs={"reading": {"agent_id": "agent-a", "value": 21.5}},
                             ignore_result=True)
        wait_until(lambda: executed(side))
        assert executed(side) == [("t.ingest", "agent-a", "21.5")]
        quarantine = get_verifier(coord).quarantine
        before = quarantine.count("identity_mismatch")
        agent.send_task("t.ingest", kwargs={"reading": {"agent_id": "agent-b", "value": 99}}, ignore_result=True)
        wait_until(lambda: quarantine.count("identity_mismatch") == before + 1)
        assert executed(side) == [("t.ingest", "agent-a", "21.5")]


def test_coordinator_command_to_agent_with_signed_result_over_mqtts(broker, signing_pki, tmp_path):
    side = tmp_path / "agent.sqlite"
    agent = mqtt_app("agentw", broker, signing_pki, "agent-a", tmp_path / "a", "agent.agent-a",
                     allowed_signers={"coordinator"})

    @agent.task(name="t.status", bind=True, shared=False)
    def status(self) -> dict:
        record_run(side, "t.status", self.request.signer.agent_id, "ran")
        return {"agent": "agent-a", "asked_by": self.request.signer.agent_id}

    coord = mqtt_app("coordc", broker, signing_pki, "coordinator", tmp_path / "c", "edge.ingest")
    with start_worker(agent, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        result = send_when_subscribed(coord, "t.status", queue="agent.agent-a")
        assert result.get(timeout=60) == {"agent": "agent-a", "asked_by": "coordinator"}
        assert executed(side) == [("t.status", "coordinator", "ran")]

        # agent-b cannot put a task into agent-a's queue: the broker refuses the publish
        intruder = mqtt_app("intruder", broker, signing_pki, "agent-b", tmp_path / "b", "agent.agent-a")
        intruder.conf.broker_transport_options = dict(intruder.conf.broker_transport_options, publish_timeout=10)
        with pytest.raises(OperationalError, match="0x87"):  # wraps kombu_mqtt.PublishRejectedError
            intruder.send_task("t.status", queue="agent.agent-a", ignore_result=True)
        time.sleep(1.0)
        assert executed(side) == [("t.status", "coordinator", "ran")]


def test_forged_and_replayed_tasks_over_mqtts_are_quarantined(broker, signing_pki, tmp_path):
    """An enrolled agent (allowed to publish into the ingest queue) replays and tampers:
    the coordinator's worker refuses, quarantines, and runs only the genuine task."""
    import base64
    import json

    from .apps import craft, publish_raw

    side = tmp_path / "coordinator.sqlite"
    coord = mqtt_app("coordq", broker, signing_pki, "coordinator", tmp_path / "c", "edge.ingest")

    @coord.task(name="t.ingest", bind=True, shared=False)
    def ingest(self, reading: dict) -> None:
        ensure_bound(self.request.signer, reading["agent_id"])
        record_run(side, "t.ingest", reading["agent_id"], str(reading["value"]))

    agent = signing_pki.identity("agent-a")
    ssl = {"ca_certs": str(signing_pki.ca_path), "certfile": str(agent.cert), "keyfile": str(agent.key)}

    from security.codec import META_KEY, Identity
    from security.envelope import certificate_pem
    from security.pki import load_certificate, load_private_key

    identity = Identity(load_private_key(agent.key), certificate_pem(load_certificate(agent.cert)))

    def signed(value: float, task_id: str) -> tuple[dict, bytes]:
        headers, _ = craft(agent, "t.ingest", [], task_id=task_id)
        meta = {"task": "t.ingest", "id": task_id, "eta": None, "expires": None, "retries": 0,
                "routing_key": "edge.ingest"}
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None, META_KEY: meta}
        return headers, identity.encode([[], {"reading": {"agent_id": "agent-a", "value": value}}, embed])

    quarantine = get_verifier(coord).quarantine
    before = {r: quarantine.count(r) for r in ("replay", "bad_signature", "header_mismatch")}
    with start_worker(coord, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        genuine_headers, genuine = signed(1.0, "task-genuine")
        deadline = time.monotonic() + 30
        while True:  # the worker's subscription may still be on its way
            try:
                publish_raw(broker.url, "edge.ingest", genuine_headers, genuine, ssl=ssl)
                break
            except kombu_mqtt.NoSubscribersError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        wait_until(lambda: executed(side))
        publish_raw(broker.url, "edge.ingest", genuine_headers, genuine, ssl=ssl)  # replay, same id
        publish_raw(broker.url, "edge.ingest", dict(genuine_headers, id="task-new-id"), genuine, ssl=ssl)
        doc = json.loads(genuine)
        payload = base64.b64decode(doc["payload"]).replace(b"1.0", b"9.0")
        doc["payload"] = base64.b64encode(payload).decode()
        tampered = json.dumps(doc, separators=(",", ":")).encode()
        publish_raw(broker.url, "edge.ingest", dict(genuine_headers, id="task-tampered"), tampered, ssl=ssl)
        wait_until(lambda: all(quarantine.count(r) == before[r] + 1 for r in before))
        assert executed(side) == [("t.ingest", "agent-a", "1.0")]
