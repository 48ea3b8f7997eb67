"""What Celery's remote control and events need from the transport, on the fake broker.

Remote control is kombu's Mailbox: a broadcast on a fanout exchange that every node's
pidbox queue must get a copy of (a plain subscription, never a share group), and
replies on a direct exchange to a reply queue that must be subscribed BEFORE the
request goes out (kombu declares it right before publishing). Events are a topic
exchange (`celeryev`) whose receivers bind `#` or `worker.#`. These tests pin the
exact subscriptions and the round trip, step by step in one thread.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue, pidbox

import kombu_mqtt.client

from .fakes import FakeBroker, FakeClient
from .test_transport_unit import drain_idle, drain_until


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    fake = FakeBroker()
    monkeypatch.setattr(kombu_mqtt.client.paho, "Client", functools.partial(FakeClient, fake))
    return fake


@pytest.fixture
def connect(broker: FakeBroker) -> Iterator[Callable[..., Connection]]:
    opened: list[Connection] = []

    def factory() -> Connection:
        conn = Connection("mqtt://fake.invalid:1883", transport_options={"reconnect_min_delay": 0.001})
        conn.connect()
        opened.append(conn)
        return conn

    yield factory
    for conn in opened:
        conn.release()


def subscriptions(broker: FakeBroker) -> set[str]:
    return {event[2] for event in broker.events if event[0] == "subscribe"}


def node(mailbox: pidbox.Mailbox, conn: Connection, name: str) -> pidbox.Node:
    handlers: dict[str, Callable[..., Any]] = {"ping": lambda state, **_: {"pong": name}}
    box = mailbox(conn).Node(name, channel=conn.default_channel, handlers=handlers)
    box.listen()
    return box


def test_broadcast_reaches_every_node_and_each_reply_reaches_the_caller(broker: FakeBroker, connect) -> None:
    mailbox = pidbox.Mailbox("ctl", type="fanout", accept=["json"])
    nodes = {name: connect() for name in ("n1", "n2")}
    for name, conn in nodes.items():
        node(mailbox, conn, name)
    assert "kombu/f/ctl.pidbox" in subscriptions(broker)  # plain: every node gets its own copy
    assert not any(s.startswith("$share/") and "/kombu/f/" in s for s in subscriptions(broker))

    caller = mailbox(connect())
    ticket = "ticket-1"
    caller._publish("ping", {}, reply_ticket=ticket, timeout=5)
    reply_filter = f"$share/{caller.oid}.reply.ctl.pidbox/kombu/d/reply.ctl.pidbox/{caller.oid}"
    order = [e[:3] for e in broker.events if e[0] in ("subscribe", "publish")]
    subscribed = next(i for i, e in enumerate(order) if e[0] == "subscribe" and e[2] == reply_filter)
    requested = next(i for i, e in enumerate(order) if e[0] == "publish" and e[2] == "kombu/f/ctl.pidbox")
    assert subscribed < requested  # listening before the request goes out
    for conn in nodes.values():
        drain_idle(conn)  # each node handles the request and publishes its reply
    replies = caller._collect(ticket, limit=2, timeout=1)
    assert sorted(replies, key=str) == [{"n1": {"pong": "n1"}}, {"n2": {"pong": "n2"}}]


def test_a_destination_limits_who_answers(broker: FakeBroker, connect) -> None:
    mailbox = pidbox.Mailbox("ctl", type="fanout", accept=["json"])
    nodes = {name: connect() for name in ("n1", "n2")}
    for name, conn in nodes.items():
        node(mailbox, conn, name)
    caller = mailbox(connect())
    caller._publish("ping", {}, destination=["n2"], reply_ticket="t-2", timeout=5)
    for conn in nodes.values():
        drain_idle(conn)
    assert caller._collect("t-2", limit=2, timeout=0.5) == [{"n2": {"pong": "n2"}}]


def test_event_receivers_bind_the_topic_exchange_with_wildcards(broker: FakeBroker, connect) -> None:
    events = Exchange("celeryev", "topic", durable=False, delivery_mode="transient")
    conn = connect()
    got: dict[str, list[str]] = {"all": [], "workers": []}
    queues = {"all": Queue("celeryev.all", events, routing_key="#", auto_delete=True, durable=False),
              "workers": Queue("celeryev.w", events, routing_key="worker.#", auto_delete=True, durable=False)}
    for name, queue in queues.items():
        Consumer(conn, [queue], no_ack=True, accept=["json"],
                 callbacks=[lambda body, msg, name=name: got[name].append(body["type"])]).consume()
    assert "$share/celeryev.all/kombu/t/celeryev/#" in subscriptions(broker)
    assert "$share/celeryev.w/kombu/t/celeryev/worker/#" in subscriptions(broker)
    producer = Producer(connect())
    for kind in ("worker-heartbeat", "task-succeeded"):
        producer.publish({"type": kind}, exchange=events, routing_key=kind.replace("-", "."), declare=[events])
    drain_until(conn, lambda: len(got["all"]) == 2 and len(got["workers"]) == 1)
    assert got == {"all": ["worker-heartbeat", "task-succeeded"], "workers": ["worker-heartbeat"]}
