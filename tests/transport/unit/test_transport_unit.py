"""kombu_mqtt against a fake paho client: acks, prefetch gate, reconnects, subscription ids.

Fast (no broker process): the fake broker in `fakes.py` lets each test decide what
arrives when, and records every packet the client sends, so the tests assert the
exact broker-side effect (which message got a PUBACK, and when).
"""

from __future__ import annotations

import base64
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.asynchronous import Hub

import kombu_mqtt
import kombu_mqtt.client
from kombu_mqtt.client import MqttSession

from .fakes import FakeBroker, FakeClient


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    fake = FakeBroker()
    monkeypatch.setattr(kombu_mqtt.client.paho, "Client", functools.partial(FakeClient, fake))
    return fake


@pytest.fixture
def connect(broker: FakeBroker) -> Iterator[Callable[..., Connection]]:
    opened: list[Connection] = []

    def factory(**options: Any) -> Connection:
        options.setdefault("reconnect_min_delay", 0.001)
        conn = Connection("mqtt://fake.invalid:1883", transport_options=options)
        conn.connect()
        opened.append(conn)
        return conn

    yield factory
    for conn in opened:
        conn.release()


def drain_until(conn: Connection, done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "condition not met"
        try:
            conn.drain_events(timeout=0.02)
        except TimeoutError:
            pass


def drain_idle(conn: Connection, rounds: int = 5) -> None:
    """Give the transport a few chances to do something it should not."""
    for _ in range(rounds):
        try:
            conn.drain_events(timeout=0.01)
        except TimeoutError:
            pass


def run_hub(hub: Hub, done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "condition not met on the Hub"
        hub.run_once()


QUEUE = Queue("jobs", Exchange("jobs", "direct"), routing_key="jobs")


def publish(conn: Connection, *bodies: Any) -> None:
    producer = Producer(conn)
    for body in bodies:
        producer.publish(body, exchange=QUEUE.exchange, routing_key="jobs")


class Held:
    """Consumer callback that keeps messages unacked (or acks them, once told to)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def __call__(self, body: Any, message: Any) -> None:
        self.messages.append(message)

    @property
    def bodies(self) -> list[Any]:
        return [m.payload for m in self.messages]


def consumer(conn: Connection, held: Held, prefetch: int) -> Consumer:
    return Consumer(conn, [QUEUE], callbacks=[held], prefetch_count=prefetch)


def kombu_body(payload: bytes) -> Any:
    """The body a producer published, from the kombu envelope on the wire."""
    raw = base64.b64decode(json.loads(payload)["body"]).decode()
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # a str body travels as text/plain


def test_the_broker_gets_a_puback_only_when_the_consumer_acks(broker: FakeBroker, connect) -> None:
    conn, held = connect(client_id="w"), Held()
    with consumer(conn, held, prefetch=10):
        drain_idle(conn)
        publish(connect(), "a", "b", "c")
        drain_until(conn, lambda: len(held.messages) == 3)
        assert broker.pubacks("w") == []
        held.messages[1].ack()
        assert [kombu_body(p) for p in broker.pubacks("w")] == ["b"]


def test_prefetch_gate_holds_the_rest_until_an_ack(broker: FakeBroker, connect) -> None:
    conn, held = connect(client_id="w"), Held()
    with consumer(conn, held, prefetch=2):
        drain_idle(conn)
        publish(connect(), *range(5))
        drain_until(conn, lambda: len(held.messages) == 2)
        drain_idle(conn)
        assert held.bodies == [0, 1]  # the broker sent all five; three wait locally
        assert len(broker.sessions["w"].inflight) == 5
        held.messages[0].ack()
        drain_until(conn, lambda: len(held.messages) == 3)
        drain_idle(conn)
        assert held.bodies == [0, 1, 2]


def test_reconnect_resumes_the_session_and_does_not_deliver_a_held_message_twice(broker: FakeBroker, connect) -> None:
    conn, held = connect(client_id="w"), Held()
    with consumer(conn, held, prefetch=1):
        drain_idle(conn)
        publish(connect(), "first", "second")
        drain_until(conn, lambda: len(held.messages) == 1)
        broker.drop("w")  # the broker resends both, with DUP, on the resumed session
        drain_until(conn, lambda: sum(1 for e in broker.events if e[:2] == ("connect", "w")) == 2)
        drain_idle(conn)
        assert ("connect", "w", False, True) in broker.events
        assert [e[2] for e in broker.events if e[0] == "subscribe" and e[1] == "w"].count("$share/jobs/kombu/d/jobs/jobs") == 2
        assert held.bodies == ["first"]
        held.messages[0].ack()
        drain_until(conn, lambda: len(held.messages) == 2)
        held.messages[1].ack()
        drain_idle(conn)
    assert held.bodies == ["first", "second"]
    assert [kombu_body(p) for p in broker.pubacks("w")] == ["first", "second"]
    assert broker.sessions["w"].inflight == {}


def test_an_ack_for_a_message_of_a_lost_session_does_not_ack_its_successor(broker: FakeBroker, connect) -> None:
    """Broker restart without persistence: packet ids start over, so an old message's
    PUBACK would ack the new message that got the same id, before it ran."""
    conn, held = connect(client_id="w"), Held()
    with consumer(conn, held, prefetch=1):
        drain_idle(conn)
        publish(connect(), "old")
        drain_until(conn, lambda: len(held.messages) == 1)
        broker.forget("w")
        drain_until(conn, lambda: [e for e in broker.events if e[:2] == ("connect", "w")][1:] == [("connect", "w", False, False)])
        publish(connect(), "new")  # gets packet id 1 again, as "old" had
        drain_idle(conn)
        assert broker.sessions["w"].inflight[1].payload and kombu_body(broker.sessions["w"].inflight[1].payload) == "new"
        held.messages[0].ack()
        assert broker.pubacks("w") == []  # "new" has not run: it must not be acked
        drain_until(conn, lambda: len(held.messages) == 2)
        assert held.bodies == ["old", "new"]
        held.messages[1].ack()
    assert [kombu_body(p) for p in broker.pubacks("w")] == ["new"]


def test_subscription_identifiers_route_to_their_queue(broker: FakeBroker, connect) -> None:
    other = Queue("other", Exchange("other", "direct"), routing_key="other")
    conn = connect(client_id="w")
    got: list[tuple[str, Any]] = []
    with Consumer(conn, [QUEUE, other], callbacks=[lambda body, msg: (got.append((msg.delivery_info["routing_key"], body)), msg.ack())]):
        drain_idle(conn)
        subscribed = {e[2]: e[3] for e in broker.events if e[0] == "subscribe" and e[1] == "w"}
        Producer(connect()).publish("to other", exchange=other.exchange, routing_key="other")
        drain_until(conn, lambda: len(got) == 1)
        # The same envelope on the same topic, but carrying the id of the `jobs`
        # subscription, belongs to `jobs`: the id decides, not the topic.
        envelope = [e[3] for e in broker.events if e[0] == "publish" and e[2] == "kombu/d/other/other"][-1]
        broker.send_to("w", "kombu/d/other/other", envelope, [subscribed["$share/jobs/kombu/d/jobs/jobs"]])
        drain_until(conn, lambda: len(got) == 2)
    assert [body for _, body in got] == ["to other", "to other"]
    assert [queue for queue, _ in got] == ["other", "other"]  # routing key of the envelope
    assert conn.transport.dead_letter_counts == {}


def test_a_resumed_session_redelivers_before_resubscribing_and_nothing_is_lost(broker: FakeBroker, connect) -> None:
    first, held = connect(client_id="w"), Held()
    with consumer(first, held, prefetch=1):
        drain_idle(first)
        publish(connect(), "kept")
        drain_until(first, lambda: len(held.messages) == 1)
    broker.drop("w")  # the worker dies (no goodbye, nothing restored): the session keeps it unacked
    second, again = connect(client_id="w"), Held()
    with consumer(second, again, prefetch=1):
        drain_until(second, lambda: len(again.messages) == 1)
        assert again.bodies == ["kept"] and again.messages[0].delivery_info["redelivered"]
        again.messages[0].ack()
    assert [kombu_body(p) for p in broker.pubacks("w")] == ["kept"]


def test_a_message_for_a_subscription_nobody_makes_goes_to_the_handler_then_is_acked(broker: FakeBroker, connect) -> None:
    def handler(queue: str, topic: str, payload: bytes, reason: str) -> None:
        broker.events.append(("handler", queue, topic, payload, reason))

    conn, held = connect(client_id="w", dead_letter_handler=handler), Held()
    with consumer(conn, held, prefetch=1):
        drain_idle(conn)
        mid = broker.send_to("w", "kombu/d/gone/gone", b"{}", [4242])
        drain_until(conn, lambda: broker.pubacks("w") == [b"{}"])
    handled = [i for i, e in enumerate(broker.events) if e[0] == "handler"]
    acked = [i for i, e in enumerate(broker.events) if e[0] == "puback"]
    assert broker.events[handled[0]][1:] == ("kombu/d/gone/gone", "kombu/d/gone/gone", b"{}", "stale_subscription")
    assert handled[0] < acked[0]  # the handler ran before the ack
    assert mid not in broker.sessions["w"].inflight
    assert held.messages == []


def test_a_failing_handler_leaves_the_message_unacked_and_is_called_again_later(broker: FakeBroker, connect) -> None:
    calls: list[bytes] = []

    def handler(queue: str, topic: str, payload: bytes, reason: str) -> None:
        calls.append(payload)
        if len(calls) == 1:
            raise OSError("quarantine disk full")

    conn, held = connect(client_id="w", dead_letter_handler=handler, dead_letter_retry=0.3), Held()
    with consumer(conn, held, prefetch=1):
        drain_idle(conn)
        broker.route("kombu/d/jobs/jobs", b"not json")
        drain_until(conn, lambda: len(calls) == 1)
        assert broker.pubacks("w") == []
        assert conn.transport.dead_letter_box.failures == 1
        broker.drop("w")  # the resumed session resends it (DUP): not a second refusal
        drain_until(conn, lambda: broker.pubacks("w") == [b"not json"])
        drain_idle(conn)
    assert calls == [b"not json", b"not json"]  # the failure, then the retry that kept it
    assert conn.transport.dead_letter_counts == {"not_a_kombu_message": 1}
    assert broker.sessions["w"].inflight == {}


# -- on a kombu Hub (the Celery worker path) ------------------------------------------------------


@pytest.fixture
def hub() -> Iterator[Hub]:
    loop = Hub()
    yield loop
    loop.close()


def on_hub(conn: Connection, hub: Hub) -> None:
    conn.transport.register_with_event_loop(conn.connection, hub)


def test_packets_left_in_the_tls_buffer_are_read_without_new_socket_data(broker: FakeBroker, connect, hub: Hub, monkeypatch) -> None:
    """Root cause of the stall: a read budget that stops with packets decrypted in the
    SSL object leaves nothing for epoll to report; they waited for unrelated bytes
    (the keepalive's PINGRESP). The transport must come back for them by itself."""
    monkeypatch.setattr(MqttSession, "read_available", functools.partialmethod(MqttSession.read_available, budget=5))
    conn, got = connect(client_id="w"), []
    with Consumer(conn, [QUEUE], callbacks=[lambda body, msg: (got.append(body), msg.ack())], prefetch_count=100):
        on_hub(conn, hub)
        run_hub(hub, lambda: any(e[0] == "subscribe" and e[1] == "w" for e in broker.events))
        producer = Producer(connect())
        broker.record_size = 50
        broker.hold = True
        for body in range(50):  # transient: the producer does not wait for the (held) PUBACKs
            producer.publish(body, exchange=QUEUE.exchange, routing_key="jobs", delivery_mode=1)
        broker.flush()  # one TLS record carrying all fifty, one byte on the wire
        run_hub(hub, lambda: len(got) == 50)
    assert got == list(range(50))


def test_acks_from_the_hub_call_soon_and_from_other_threads_keep_the_gate_moving(broker: FakeBroker, connect, hub: Hub) -> None:
    conn, seen, outstanding, peak = connect(client_id="w"), [], set(), [0]

    def on_message(body: Any, message: Any) -> None:
        seen.append(body)
        outstanding.add(body)
        peak[0] = max(peak[0], len(outstanding))

        def ack() -> None:
            outstanding.discard(body)
            message.ack()

        if body % 2:
            hub.call_soon(ack)  # as Celery does
        else:
            threading.Thread(target=ack).start()  # as a thread pool does

    with Consumer(conn, [QUEUE], callbacks=[on_message], prefetch_count=3):
        on_hub(conn, hub)
        run_hub(hub, lambda: any(e[0] == "subscribe" and e[1] == "w" for e in broker.events))
        publish(connect(), *range(30))
        run_hub(hub, lambda: len(seen) == 30 and not outstanding and len(broker.pubacks("w")) == 30)
    assert seen == list(range(30))
    assert peak[0] <= 3


def test_on_the_hub_a_failed_handler_call_is_retried_on_the_keepalive_tick(broker: FakeBroker, connect, hub: Hub) -> None:
    calls: list[bytes] = []

    def handler(queue: str, topic: str, payload: bytes, reason: str) -> None:
        calls.append(payload)
        if len(calls) == 1:
            raise OSError("quarantine disk full")

    conn = connect(client_id="w", dead_letter_handler=handler, dead_letter_retry=0.01, keepalive=3)  # tick: 1 s
    with Consumer(conn, [QUEUE], callbacks=[lambda body, msg: msg.ack()], prefetch_count=1):
        on_hub(conn, hub)
        run_hub(hub, lambda: any(e[0] == "subscribe" and e[1] == "w" for e in broker.events))
        broker.route("kombu/d/jobs/jobs", b"not json")
        run_hub(hub, lambda: broker.pubacks("w") == [b"not json"])
    assert calls == [b"not json", b"not json"]


def test_acking_on_a_closed_channel_is_a_no_op_and_the_broker_redelivers(broker: FakeBroker, connect) -> None:
    """A consumer that finishes a message after its channel closed (a batch committed while
    the connection was lost) must not crash the worker: the ack is a no-op, and the
    message comes back once (the closing channel put it back, as for any unacked one)."""
    conn, held = connect(client_id="w"), Held()
    with consumer(conn, held, prefetch=10) as c:
        drain_idle(conn)
        publish(connect(), "a", "b")
        drain_until(conn, lambda: len(held.messages) == 2)
        c.channel.close()
        held.messages[0].ack()  # no AttributeError from a channel without its transport
        held.messages[1].reject(requeue=True)  # nor from a requeue, which cannot republish any more
    again, second = connect(client_id="w"), Held()
    with consumer(again, second, prefetch=10):
        drain_until(again, lambda: len(second.messages) == 2)
        drain_idle(again)
        assert sorted(second.bodies) == ["a", "b"]


def test_a_publish_the_dead_socket_refused_goes_out_again_on_a_new_connection(broker: FakeBroker, connect) -> None:
    """The broker restarted within `probe_interval` of the last probe, so the next publish
    found the socket dead only while writing it (paho: connection lost). Nothing reached
    the broker: the transport reconnects and sends it once more instead of failing."""
    from types import SimpleNamespace

    from .fakes import CONN_LOST

    conn = connect()
    producer = Producer(conn)
    producer.publish("first", exchange=QUEUE.exchange, routing_key="jobs", delivery_mode=1)
    session = conn.transport._ephemeral.session
    broker.drop(session.client_id)
    session._last_probe = time.monotonic()  # within probe_interval: no probe before the next publish
    dead = session._client
    dead.publish = lambda *args, **kwargs: SimpleNamespace(rc=CONN_LOST, mid=0)  # the write hit the dead socket
    producer.publish("second", exchange=QUEUE.exchange, routing_key="jobs", delivery_mode=1)
    assert session._client is not dead
    assert sum(1 for e in broker.events if e[:2] == ("connect", session.client_id)) == 2
    assert [kombu_body(e[3]) for e in broker.events if e[0] == "publish"] == ["first", "second"]
