"""acl_mode='dynsec': Mosquitto's dynamic-security plugin with one role per agent.
Closes what acl_file cannot: SUBSCRIBE (and shared-subscription groups) are checked,
agents are added at runtime, and disabling an agent cuts its live connection."""

from __future__ import annotations

import time

import pytest

from security.dynsec import add_agent_commands, remove_agent_commands, send_commands

from .broker import connect_as, signing_fleet_broker

NOT_AUTHORIZED = 0x87
A_QUEUE = "kombu/d/agent.agent-a/agent.agent-a"
B_QUEUE = "kombu/d/agent.agent-b/agent.agent-b"
INGEST = "kombu/d/edge.ingest/edge.ingest"


@pytest.fixture(scope="module")
def broker(signing_pki, tmp_path_factory):
    b = signing_fleet_broker(signing_pki, tmp_path_factory.mktemp("dynsec-broker"), acl_mode="dynsec", agent_ids=("agent-a", "agent-b"))
    yield b
    b.stop()


def admin(broker, signing_pki) -> dict:
    ident = signing_pki.identity("coordinator")
    return {"ca_certs": str(signing_pki.ca_path), "certfile": str(ident.cert), "keyfile": str(ident.key)}


def test_subscriptions_are_checked_per_agent(broker, signing_pki):
    a = connect_as(broker, signing_pki, "agent-a")
    coord = connect_as(broker, signing_pki, "coordinator")
    try:
        assert a.subscribe(f"$share/agent.agent-a/{A_QUEUE}") == [1]
        for foreign in (f"$share/agent.agent-b/{B_QUEUE}", B_QUEUE, A_QUEUE, "#", f"$share/edge.ingest/{INGEST}",
                        "kombu/f/celery.pidbox", "$CONTROL/dynamic-security/#"):
            assert a.subscribe(foreign) == [NOT_AUTHORIZED], foreign
        assert coord.subscribe(f"$share/edge.ingest/{INGEST}") == [1]
        assert coord.subscribe("kombu/#") == [1]
    finally:
        a.close()
        coord.close()


def test_foreign_share_group_cannot_take_another_agents_commands(broker, signing_pki):
    a = connect_as(broker, signing_pki, "agent-a")
    b = connect_as(broker, signing_pki, "agent-b")
    coord = connect_as(broker, signing_pki, "coordinator")
    try:
        assert b.subscribe(f"$share/agent.agent-b/{B_QUEUE}") == [1]
        assert a.subscribe(f"$share/agent.agent-b/{B_QUEUE}") == [NOT_AUTHORIZED]
        for i in range(6):
            assert coord.publish(B_QUEUE, f"cmd-{i}".encode()) == 0
        deadline = time.monotonic() + 10
        while len(b.messages) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(p for _, p in b.messages) == [f"cmd-{i}".encode() for i in range(6)]
        assert a.messages == []
    finally:
        for p in (a, b, coord):
            p.close()


def test_publish_rules_match_file_mode(broker, signing_pki):
    a = connect_as(broker, signing_pki, "agent-a")
    coord = connect_as(broker, signing_pki, "coordinator")
    try:
        coord.subscribe("kombu/#")
        assert a.publish(INGEST, b"reading") == 0
        assert a.publish("kombu/d/c.rep/reply-1", b"result") == 0
        for topic in (B_QUEUE, "kombu/d/amq.default/agent.agent-b", "kombu/f/celery.pidbox", "$CONTROL/dynamic-security/v1"):
            assert a.publish(topic, b"forged") == NOT_AUTHORIZED, topic
        deadline = time.monotonic() + 10
        while len(coord.messages) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        assert sorted(p for _, p in coord.messages) == [b"reading", b"result"]
    finally:
        a.close()
        coord.close()


def test_agent_enrolled_at_runtime_then_removed_loses_its_connection_and_rights(broker, signing_pki):
    queue = "kombu/d/agent.agent-late/agent.agent-late"
    late = connect_as(broker, signing_pki, "agent-late")
    try:
        assert late.subscribe(f"$share/agent.agent-late/{queue}") == [NOT_AUTHORIZED]  # not enrolled yet
    finally:
        late.close()
    send_commands("127.0.0.1", broker.port, admin(broker, signing_pki), add_agent_commands("agent-late"))
    late = connect_as(broker, signing_pki, "agent-late")
    coord = connect_as(broker, signing_pki, "coordinator")
    try:
        assert late.subscribe(f"$share/agent.agent-late/{queue}") == [1]
        assert coord.publish(queue, b"hello") == 0
        deadline = time.monotonic() + 10
        while not late.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        assert late.messages == [(queue, b"hello")]
        send_commands("127.0.0.1", broker.port, admin(broker, signing_pki), remove_agent_commands("agent-late"))
        deadline = time.monotonic() + 10
        while not late.disconnects and time.monotonic() < deadline:
            time.sleep(0.02)
        assert late.disconnects, "removing the agent did not cut its live connection"
    finally:
        late.close()
    again = connect_as(broker, signing_pki, "agent-late")  # its certificate is still valid (no CRL entry) ...
    try:
        assert again.subscribe(f"$share/agent.agent-late/{queue}") == [NOT_AUTHORIZED]  # ... but it has no rights
        assert again.publish(INGEST, b"x") == NOT_AUTHORIZED
        assert coord.publish(queue, b"after") in (0, 0x10)  # 0x10: nobody may receive it
        time.sleep(0.5)
        assert again.messages == []
    finally:
        again.close()
        coord.close()
