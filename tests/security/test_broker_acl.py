"""The broker's ACLs and CRL, against a real Mosquitto started from our renderer,
probed with raw paho clients over mutual TLS (client certificates from the test PKI)."""

from __future__ import annotations

import ssl
import time

import pytest

from security.mosquitto_config import MosquittoSettings, render_mosquitto_config
from security.pki import CertificateAuthority

from .broker import connect_as, probe, signing_fleet_broker

NOT_AUTHORIZED = 0x87

AGENT_A_QUEUE = "kombu/d/agent.agent-a/agent.agent-a"
AGENT_B_QUEUE = "kombu/d/agent.agent-b/agent.agent-b"
INGEST = "kombu/d/edge.ingest/edge.ingest"


@pytest.fixture(scope="module")
def broker(signing_pki, tmp_path_factory):
    b = signing_fleet_broker(signing_pki, tmp_path_factory.mktemp("fleet-broker"), acl_mode="file")  # the unsafe, non-default mode these tests document
    yield b
    b.stop()


def settle(probes, seconds: float = 1.0) -> None:
    """Give the broker time to deliver anything it would deliver (asserting absence)."""
    time.sleep(seconds)


def test_agent_reads_only_its_own_queue(broker, signing_pki):
    coord = connect_as(broker, signing_pki, "coordinator")
    a = connect_as(broker, signing_pki, "agent-a")
    try:
        for topic in (f"$share/agent.agent-a/{AGENT_A_QUEUE}", AGENT_B_QUEUE, f"$share/edge.ingest/{INGEST}",
                      "#", "kombu/f/celery.pidbox", "kombu/d/c.rep/+"):
            a.subscribe(topic)  # Mosquitto 2.0 grants any filter; delivery is what the ACL checks
        assert coord.publish(AGENT_A_QUEUE, b"for-a") == 0
        assert coord.publish(AGENT_B_QUEUE, b"for-b") == 0
        assert coord.publish(INGEST, b"ingest") == 0
        assert coord.publish("kombu/f/celery.pidbox", b"pidbox") == 0
        assert coord.publish("kombu/d/c.rep/some-reply-id", b"reply") == 0
        deadline = time.monotonic() + 10
        while not a.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        settle([a])
        payloads = [p for _, p in a.messages]
        assert b"for-a" in payloads
        assert set(payloads) == {b"for-a"}, f"agent-a received foreign messages: {a.messages}"
    finally:
        coord.close()
        a.close()


def test_agent_cannot_publish_into_another_queue_or_control_topics(broker, signing_pki):
    a = connect_as(broker, signing_pki, "agent-a")
    b = connect_as(broker, signing_pki, "agent-b")
    coord = connect_as(broker, signing_pki, "coordinator")
    try:
        b.subscribe(f"$share/agent.agent-b/{AGENT_B_QUEUE}")
        coord.subscribe("kombu/#")
        for topic in (AGENT_B_QUEUE, "kombu/d/amq.default/agent.agent-b", "kombu/f/celery.pidbox",
                      "kombu/t/celeryev/worker/heartbeat", "kombu/d/other.queue/other.queue"):
            assert a.publish(topic, b"forged") == NOT_AUTHORIZED, topic
        settle([b, coord])
        assert b.messages == []
        assert coord.messages == []
    finally:
        for p in (a, b, coord):
            p.close()


def test_agent_can_publish_ingest_and_replies_to_the_coordinator(broker, signing_pki):
    a = connect_as(broker, signing_pki, "agent-a")
    coord = connect_as(broker, signing_pki, "coordinator")
    try:
        coord.subscribe(f"$share/edge.ingest/{INGEST}")
        coord.subscribe("kombu/d/c.rep/+")
        assert a.publish(INGEST, b"reading") == 0
        assert a.publish("kombu/d/c.rep/0b8c6d2e-reply", b"result") == 0
        deadline = time.monotonic() + 10
        while len(coord.messages) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(p for _, p in coord.messages) == [b"reading", b"result"]
    finally:
        a.close()
        coord.close()


def test_joining_another_agents_share_group_leaks_nothing(broker, signing_pki):
    """Confidentiality holds even when agent-a joins agent-b's shared-subscription group."""
    a = connect_as(broker, signing_pki, "agent-a")
    b = connect_as(broker, signing_pki, "agent-b")
    coord = connect_as(broker, signing_pki, "coordinator")
    try:
        b.subscribe(f"$share/agent.agent-b/{AGENT_B_QUEUE}")
        a.subscribe(f"$share/agent.agent-b/{AGENT_B_QUEUE}")
        for i in range(6):
            assert coord.publish(AGENT_B_QUEUE, f"cmd-{i}".encode()) == 0
        deadline = time.monotonic() + 10
        while not b.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        settle([a, b])
        assert a.messages == []
        assert b.messages  # b still gets its share
    finally:
        for p in (a, b, coord):
            p.close()


def test_session_takeover_by_client_id_gets_no_foreign_messages(broker, signing_pki):
    """agent-a reusing the coordinator's persistent client id receives none of its queue."""
    cid = "coordinator-consumer-test"
    coord = connect_as(broker, signing_pki, "coordinator", client_id=cid, clean_start=False, session_expiry=300)
    coord.subscribe(f"$share/edge.ingest/{INGEST}")
    coord.close()
    b = connect_as(broker, signing_pki, "agent-b")
    try:
        assert b.publish(INGEST, b"queued-for-coordinator") == 0
    finally:
        b.close()
    thief = connect_as(broker, signing_pki, "agent-a", client_id=cid, clean_start=False, session_expiry=300)
    try:
        settle([thief], 1.5)
        assert thief.messages == []
    finally:
        thief.close()


def test_unknown_ca_and_self_signed_clients_are_refused(broker, signing_pki, tmp_path):
    from security.pki import issue_identity

    rogue_ca = CertificateAuthority.create("rogue CA")
    cert, key = issue_identity(rogue_ca, tmp_path, "agent-a")
    with pytest.raises((ssl.SSLError, OSError, ConnectionError)):
        p = probe(broker.port, signing_pki.ca_path, cert, key)
        p.close()


def test_revoked_certificate_is_refused_after_reload(broker, signing_pki):
    victim = signing_pki.issue("agent-revoked")
    p = probe(broker.port, signing_pki.ca_path, victim.cert, victim.key)
    p.close()
    signing_pki.revoke(victim)
    broker.reload()
    deadline = time.monotonic() + 15
    refused = False
    while time.monotonic() < deadline and not refused:
        try:
            p = probe(broker.port, signing_pki.ca_path, victim.cert, victim.key)
            p.close()
            time.sleep(0.2)
        except (ssl.SSLError, OSError, ConnectionError):
            refused = True
    assert refused, "revoked certificate still connects after SIGHUP"
    other = connect_as(broker, signing_pki, "agent-a")  # everyone else still gets in
    other.close()


def test_rendered_config_has_the_settings_the_transport_needs(tmp_path):
    s = MosquittoSettings(cafile=tmp_path / "ca.pem", certfile=tmp_path / "b.pem", keyfile=tmp_path / "b.key",
                          crlfile=tmp_path / "crl.pem", host="127.0.0.1", port=18883, persistence=True,
                          persistence_location=tmp_path / "p", max_queued_messages=500000, run_as_root=True,
                          coordinator_identities=("coordinator", "coordinator-2"), acl_mode="file")
    conf, acl = render_mosquitto_config(s, tmp_path / "acl")
    lines = set(conf.splitlines())
    for expected in ("user root", "per_listener_settings false", "allow_anonymous false",
                     f"acl_file {tmp_path / 'acl'}", "persistence true", f"persistence_location {tmp_path / 'p'}/",
                     "max_queued_messages 500000", "listener 18883 127.0.0.1", f"crlfile {tmp_path / 'crl.pem'}",
                     "require_certificate true", "use_identity_as_username true"):
        assert expected in lines, expected
    assert "user coordinator\ntopic readwrite #" in acl and "user coordinator-2\ntopic readwrite #" in acl
    s.run_as_root = False
    assert "user root" not in render_mosquitto_config(s, tmp_path / "acl")[0].splitlines()


def test_coordinator_adapter_renders_acl_and_conf(tmp_path):
    from types import SimpleNamespace

    from security.mosquitto_conf import render_for_coordinator

    cfg = SimpleNamespace(ca_path=tmp_path / "ca.pem", crl_path=tmp_path / "crl.pem", identity="coord-1",
                          broker=SimpleNamespace(host="127.0.0.1", port=18884, max_queued_messages=123456, acl_mode="file",
                                                 autosave_interval=17))
    store = SimpleNamespace(broker_cert=tmp_path / "broker.pem", broker_key=tmp_path / "broker.key")
    conf = render_for_coordinator(cfg, store, tmp_path / "mq")
    assert f"acl_file {tmp_path / 'mq' / 'acl'}" in conf.splitlines()
    assert "max_queued_messages 123456" in conf and "listener 18884 127.0.0.1" in conf
    assert "autosave_interval 17" in conf.splitlines()
    assert "user coord-1\ntopic readwrite #" in (tmp_path / "mq" / "acl").read_text()


def test_coordinator_adapter_dynsec_mode_lists_enrolled_agents(tmp_path):
    import json
    from types import SimpleNamespace

    from security.mosquitto_conf import render_for_coordinator

    cfg = SimpleNamespace(ca_path=tmp_path / "ca.pem", crl_path=None, identity="coordinator",
                          broker=SimpleNamespace(host="127.0.0.1", port=18885, acl_mode="dynsec"))
    issued = [SimpleNamespace(name="agent-1"), SimpleNamespace(name="agent-2"), SimpleNamespace(name="gone")]
    store = SimpleNamespace(broker_cert=tmp_path / "b.pem", broker_key=tmp_path / "b.key",
                            issued=lambda: issued, is_revoked=lambda name: name == "gone")
    conf = render_for_coordinator(cfg, store, tmp_path / "mq")
    assert f"plugin_opt_config_file {tmp_path / 'mq' / 'dynamic-security.json'}" in conf.splitlines()
    doc = json.loads((tmp_path / "mq" / "dynamic-security.json").read_text())
    assert [c["username"] for c in doc["clients"]] == ["coordinator", "agent-1", "agent-2"]
