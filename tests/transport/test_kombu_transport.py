"""kombu-level behaviour of the MQTT transport against a real Mosquitto (plain and TLS)."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as paho
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.transport import TRANSPORT_ALIASES, resolve_transport

import kombu_mqtt
from kombu_mqtt.options import TransportOptions
from kombu_mqtt.transport import TLSTransport, Transport


def drain_until(conn: Connection, done, timeout: float = 20.0) -> None:
    """Drain events until done() is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before timeout")
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            pass


def drain_quietly(conn: Connection, seconds: float) -> None:
    """Drain for a fixed window (used to show that nothing more arrives)."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            conn.drain_events(timeout=remaining)
        except TimeoutError:
            pass


def test_importing_registers_both_schemes() -> None:
    assert TRANSPORT_ALIASES["mqtt"] == "kombu_mqtt.transport:Transport"
    assert TRANSPORT_ALIASES["mqtts"] == "kombu_mqtt.transport:TLSTransport"
    assert resolve_transport("mqtts") is TLSTransport
    assert resolve_transport("mqtt") is Transport
    assert TLSTransport.default_port == 8883 and Transport.default_port == 1883
    assert Transport.implements.asynchronous and Transport.polling_interval is None


def test_transport_options_are_typed_and_validated() -> None:
    opts = TransportOptions.from_mapping({"keepalive": "30", "topic_prefix": "fleet", "polling_interval": 1})
    assert opts.keepalive == 30 and opts.topic_prefix == "fleet" and opts.no_subscribers == "raise"
    with pytest.raises(ValueError, match="keepalive"):
        TransportOptions.from_mapping({"keepalive": "soon"})
    with pytest.raises(ValueError, match="topic_prefix"):
        TransportOptions.from_mapping({"topic_prefix": "a/b"})


def test_direct_round_trip_with_broker_ack(connect, unique) -> None:
    queue = Queue(unique, Exchange(unique, "direct"), routing_key=unique)
    consumer_conn = connect(client_id=f"{unique}-c")
    got: list[dict] = []
    with Consumer(consumer_conn, [queue], callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
        drain_quietly(consumer_conn, 0.2)  # opens the durable session and subscribes
        producer = Producer(connect())
        for i in range(5):
            producer.publish({"i": i}, exchange=queue.exchange, routing_key=unique, declare=[queue])
        drain_until(consumer_conn, lambda: len(got) == 5)
    assert [body["i"] for body in got] == [0, 1, 2, 3, 4]


def test_publish_without_subscribers_raises_no_subscribers_error(connect, unique) -> None:
    producer = Producer(connect())
    with pytest.raises(kombu_mqtt.NoSubscribersError, match=f"kombu/d/{unique}/k.*start a worker"):
        producer.publish({"x": 1}, exchange=Exchange(unique, "direct"), routing_key="k", delivery_mode=2)


def test_transient_fanout_and_ignored_publishes_do_not_raise(connect, unique) -> None:
    producer = Producer(connect())
    producer.publish({"x": 1}, exchange=Exchange(unique, "direct"), routing_key="k", delivery_mode=1)
    fanout = Exchange(f"{unique}.f", "fanout")
    producer.publish({"x": 1}, exchange=fanout, routing_key="", delivery_mode=2, declare=[fanout])
    quiet = Producer(connect(no_subscribers="ignore"))
    quiet.publish({"x": 1}, exchange=Exchange(unique, "direct"), routing_key="k", delivery_mode=2)


def test_fanout_gives_each_bound_queue_a_copy(connect, unique) -> None:
    exchange = Exchange(unique, "fanout", durable=False)
    received: dict[str, list] = {"a": [], "b": []}
    conns = []
    consumers = []
    for name in ("a", "b"):
        conn = connect()
        queue = Queue(f"{unique}.{name}", exchange, durable=False, auto_delete=True)
        consumer = Consumer(conn, [queue], no_ack=True, callbacks=[lambda body, msg, name=name: received[name].append(body)])
        consumer.consume()
        conns.append(conn)
        consumers.append(consumer)
    Producer(connect()).publish({"hello": 1}, exchange=exchange, routing_key="", declare=[exchange])
    for conn, name in zip(conns, ("a", "b"), strict=False):
        drain_until(conn, lambda name=name: received[name])
    assert received == {"a": [{"hello": 1}], "b": [{"hello": 1}]}


def test_topic_exchange_wildcards_route_in_the_broker(connect, unique) -> None:
    exchange = Exchange(unique, "topic")
    conn = connect(client_id=f"{unique}-c")
    got: dict[str, list[str]] = {"star": [], "hash": []}
    star = Queue(f"{unique}.star", exchange, routing_key="sensor.*.temp")
    hashq = Queue(f"{unique}.hash", exchange, routing_key="sensor.#")
    with Consumer(conn, [star], callbacks=[lambda body, msg: (got["star"].append(body), msg.ack())]), Consumer(
        conn, [hashq], callbacks=[lambda body, msg: (got["hash"].append(body), msg.ack())]
    ):
        drain_quietly(conn, 0.2)
        producer = Producer(connect())
        for key in ("sensor.a.temp", "sensor.b.humidity", "sensor", "other.a.temp"):
            producer.publish(key, exchange=exchange, routing_key=key, delivery_mode=1, declare=[exchange])
        drain_until(conn, lambda: len(got["star"]) == 1 and len(got["hash"]) == 3)
        drain_quietly(conn, 0.3)
    assert got["star"] == ["sensor.a.temp"]
    assert sorted(got["hash"]) == ["sensor", "sensor.a.temp", "sensor.b.humidity"]


@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetch_is_honoured_exactly(connect, unique, prefetch: int) -> None:
    queue = Queue(unique, Exchange(unique, "direct"), routing_key=unique)
    conn = connect(client_id=f"{unique}-c")
    held: list = []
    auto_ack = False

    def on_message(body, msg):
        held.append(msg)
        if auto_ack:
            msg.ack()

    with Consumer(conn, [queue], callbacks=[on_message], prefetch_count=prefetch):
        drain_quietly(conn, 0.2)
        producer = Producer(connect())
        for i in range(8):
            producer.publish(i, exchange=queue.exchange, routing_key=unique)
        drain_until(conn, lambda: len(held) == prefetch)
        drain_quietly(conn, 0.5)
        assert len(held) == prefetch  # nothing beyond prefetch while unacked
        held[0].ack()
        drain_until(conn, lambda: len(held) == prefetch + 1)
        drain_quietly(conn, 0.3)
        assert len(held) == prefetch + 1
        auto_ack = True
        for msg in held[1:]:
            msg.ack()
        drain_until(conn, lambda: len(held) == 8)
    assert sorted(msg.payload for msg in held) == list(range(8))


def test_reject_with_requeue_redelivers(connect, unique) -> None:
    queue = Queue(unique, Exchange(unique, "direct"), routing_key=unique)
    conn = connect(client_id=f"{unique}-c")
    seen: list[tuple[int, bool]] = []

    def on_message(body, msg):
        seen.append((body, msg.delivery_info.get("redelivered", False)))
        if len(seen) == 1:
            msg.requeue()
        else:
            msg.ack()

    with Consumer(conn, [queue], callbacks=[on_message], prefetch_count=1):
        drain_quietly(conn, 0.2)
        Producer(connect()).publish(7, exchange=queue.exchange, routing_key=unique)
        drain_until(conn, lambda: len(seen) == 2)
    assert seen == [(7, False), (7, True)]


def test_garbage_payload_is_set_aside_and_acked(connect, unique, mosquitto) -> None:
    queue = Queue(unique, Exchange(unique, "direct"), routing_key=unique)
    conn = connect(client_id=f"{unique}-c")
    got: list = []
    with Consumer(conn, [queue], callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
        drain_quietly(conn, 0.2)
        raw = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        raw.connect("127.0.0.1", mosquitto.plain_port)
        raw.loop_start()
        try:
            raw.publish(f"kombu/d/{unique}/{unique}", b"\x00not json", qos=1).wait_for_publish(10)
            raw.publish(f"kombu/d/{unique}/{unique}", b'{"json": "but not kombu"}', qos=1).wait_for_publish(10)
        finally:
            raw.loop_stop()
            raw.disconnect()
        Producer(connect()).publish("good", exchange=queue.exchange, routing_key=unique)
        drain_until(conn, lambda: got == ["good"])
    dead = list(conn.transport.dead_letters)
    assert [queue_name for queue_name, _ in dead] == [unique, unique]
    assert dead[0][1] == b"\x00not json"


def test_ephemeral_reply_queue_declared_on_producer_is_taken_over_by_consumer(connect, unique) -> None:
    """Celery's rpc:// declares the reply queue on the producer connection before it consumes."""
    reply = Queue(unique, Exchange("", "direct"), routing_key=unique, durable=False, auto_delete=True)
    producer_conn = connect()
    reply(producer_conn.default_channel).declare()
    Producer(connect()).publish("early", exchange="", routing_key=unique)
    consumer_conn = connect()
    got: list = []
    with Consumer(consumer_conn, [reply], no_ack=True, callbacks=[lambda body, msg: got.append(body)]):
        Producer(connect()).publish("late", exchange="", routing_key=unique)
        drain_until(consumer_conn, lambda: len(got) == 2)
    assert got == ["early", "late"]


def test_bad_client_certificate_fails_with_actionable_message(mosquitto, test_pki, tmp_path) -> None:
    options = test_pki.ssl_options("kombu-test")
    options["ca_certs"] = str(tmp_path / "missing-ca.pem")
    with pytest.raises(FileNotFoundError):
        Connection(mosquitto.tls_url, ssl=options).connect()
    no_client_cert = {"ca_certs": str(test_pki.ca_path)}
    conn = Connection(mosquitto.tls_url, ssl=no_client_cert, transport_options={"reconnect_timeout": 1}, connect_timeout=5)
    with pytest.raises(Exception, match="closed the connection during CONNECT: with TLS, check that certfile/keyfile"):
        conn.ensure_connection(max_retries=1)
    conn.release()


def test_backoff_is_jittered_exponential_and_capped() -> None:
    """Full jitter: each delay is uniform in [0, d], d doubling from the first delay up to the cap."""
    import random

    from kombu_mqtt.backoff import Backoff

    backoff = Backoff(0.1, 1.0, rng=random.Random(7))
    samples = [backoff.next() for _ in range(8)]
    bounds = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert [backoff.ceiling(n) for n in range(8)] == pytest.approx(bounds)
    assert all(0.0 <= got <= bound for got, bound in zip(samples, bounds, strict=True))
    assert len(set(samples)) == len(samples)  # jittered, not a fixed schedule
    polls = Backoff(0.002, 0.1, factor=1.5, jitter=False)
    assert [polls.next() for _ in range(3)] == pytest.approx([0.002, 0.003, 0.0045])


def test_connect_retries_until_the_broker_comes_up(fresh_mosquitto) -> None:
    fresh_mosquitto.stop()
    starter = threading.Timer(1.5, fresh_mosquitto.start)
    starter.start()
    try:
        with Connection(fresh_mosquitto.plain_url, transport_options={"reconnect_timeout": 30}) as conn:
            conn.connect()
            assert conn.connected
            Producer(conn).publish({"x": 1}, exchange="", routing_key="nobody", delivery_mode=1)
    finally:
        starter.join()


def test_producer_reconnects_after_broker_restart(fresh_mosquitto) -> None:
    with Connection(fresh_mosquitto.plain_url) as conn:
        producer = Producer(conn)
        producer.publish({"x": 1}, exchange="", routing_key="q", delivery_mode=1)
        fresh_mosquitto.restart()
        producer.publish({"x": 2}, exchange="", routing_key="q", delivery_mode=1)
        assert conn.transport.session_alive()


def test_stale_subscription_in_a_reused_session_is_set_aside(connect, unique) -> None:
    """A worker restarted with the same client_id but fewer queues must not jam on the old ones."""
    kept = Queue(f"{unique}.kept", Exchange(unique, "direct"), routing_key="kept")
    dropped = Queue(f"{unique}.dropped", Exchange(unique, "direct"), routing_key="dropped")
    first = connect(client_id=f"{unique}-w")
    with Consumer(first, [kept, dropped], callbacks=[lambda body, msg: msg.ack()], prefetch_count=1):
        drain_quietly(first, 0.2)
    first.release()
    second = connect(client_id=f"{unique}-w")
    got: list = []
    with Consumer(second, [kept], callbacks=[lambda body, msg: (got.append(body), msg.ack())], prefetch_count=1):
        drain_quietly(second, 0.2)
        producer = Producer(connect())
        producer.publish("for the old queue", exchange=dropped.exchange, routing_key="dropped", declare=[dropped])
        producer.publish("for the kept queue", exchange=kept.exchange, routing_key="kept")
        drain_until(second, lambda: got == ["for the kept queue"])
    [(topic, payload)] = second.transport.dead_letters
    assert topic == f"kombu/d/{unique}/dropped"
    assert json.loads(payload)["properties"]["delivery_info"]["routing_key"] == "dropped"


def test_large_messages_are_written_completely(connect, unique) -> None:
    """A payload bigger than the socket buffer must still go out from a producer connection."""
    queue = Queue(unique, Exchange(unique, "direct"), routing_key=unique, durable=False, auto_delete=True)
    conn = connect()
    got: list = []
    blob = "x" * 700_000  # below the test broker's 1 MiB max_packet_size once base64-encoded
    with Consumer(conn, [queue], no_ack=True, callbacks=[lambda body, msg: got.append(len(body))]):
        producer = Producer(connect())
        for _ in range(3):
            producer.publish(blob, exchange=queue.exchange, routing_key=unique, delivery_mode=1, serializer="raw")
        drain_until(conn, lambda: len(got) == 3)
    assert got == [700_000] * 3


def publish_raw(mosquitto, topic: str, *payloads: bytes) -> None:
    """Publish bytes that are not kombu messages, as a foreign MQTT client would."""
    raw = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    raw.connect("127.0.0.1", mosquitto.plain_port)
    raw.loop_start()
    try:
        for payload in payloads:
            raw.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        raw.loop_stop()
        raw.disconnect()


#: (queue, topic, payload, reason) per call of `recording_handler`, in this process
HANDLED: list[tuple[str, str, bytes, str]] = []


def recording_handler(queue: str, topic: str, payload: bytes, reason: str) -> None:
    """A dead_letter_handler given to the transport as an importable string."""
    HANDLED.append((queue, topic, payload, reason))


def test_dead_letter_handler_gets_refused_messages_before_the_ack(connect, unique, mosquitto) -> None:
    queue = Queue(unique, Exchange(unique, "direct"), routing_key=unique)
    HANDLED.clear()
    conn = connect(client_id=f"{unique}-c", dead_letter_handler=f"{__name__}:recording_handler")
    got: list = []
    with Consumer(conn, [queue], callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
        drain_quietly(conn, 0.2)
        publish_raw(mosquitto, f"kombu/d/{unique}/{unique}", b"\x00not json")
        Producer(connect()).publish("good", exchange=queue.exchange, routing_key=unique)
        drain_until(conn, lambda: got == ["good"] and HANDLED)
    assert HANDLED == [(unique, f"kombu/d/{unique}/{unique}", b"\x00not json", "not_a_kombu_message")]
    assert conn.transport.dead_letter_counts == {"not_a_kombu_message": 1}
    conn.release()
    # It was acked: the persistent session does not hand it out again.
    again = connect(client_id=f"{unique}-c", dead_letter_handler=f"{__name__}:recording_handler")
    with Consumer(again, [queue], callbacks=[lambda body, msg: msg.ack()]):
        drain_quietly(again, 1.0)
    assert len(HANDLED) == 1


def test_a_failing_dead_letter_handler_leaves_the_message_with_the_broker(connect, unique, mosquitto) -> None:
    queue = Queue(unique, Exchange(unique, "direct"), routing_key=unique)
    calls: list[bytes] = []

    def failing(queue_name: str, topic: str, payload: bytes, reason: str) -> None:
        calls.append(payload)
        raise RuntimeError("quarantine database is locked")

    def keeping(queue_name: str, topic: str, payload: bytes, reason: str) -> None:
        calls.append(payload)

    first = connect(client_id=f"{unique}-c", dead_letter_handler=failing)
    with Consumer(first, [queue], callbacks=[lambda body, msg: msg.ack()]):
        drain_quietly(first, 0.2)
        publish_raw(mosquitto, f"kombu/d/{unique}/{unique}", b"garbage")
        drain_until(first, lambda: calls == [b"garbage"])
    assert first.transport.dead_letter_box.failures == 1
    first.release()
    # Not acked: the resumed session gets it again, and a working handler keeps it.
    second = connect(client_id=f"{unique}-c", dead_letter_handler=keeping)
    with Consumer(second, [queue], callbacks=[lambda body, msg: msg.ack()]):
        drain_until(second, lambda: calls == [b"garbage", b"garbage"])
    second.release()
    third = connect(client_id=f"{unique}-c", dead_letter_handler=keeping)
    with Consumer(third, [queue], callbacks=[lambda body, msg: msg.ack()]):
        drain_quietly(third, 1.0)
    assert calls == [b"garbage", b"garbage"]


def test_dead_letter_handler_option_is_validated() -> None:
    with pytest.raises(ValueError, match="dead_letter_handler"):
        TransportOptions.from_mapping({"dead_letter_handler": 42})
    from kombu_mqtt.deadletter import resolve_handler

    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_handler("no_such_module_here:handler")
    assert resolve_handler(f"{__name__}:recording_handler") is recording_handler


def test_an_ack_after_the_broker_lost_the_session_does_not_ack_the_next_task(fresh_mosquitto, unique) -> None:
    """Broker restart without persistence while a task is held: packet ids start over, so
    the held task's late ack must not become the PUBACK of the next task (which the broker
    would then forget before it ran: lost if the worker dies before running it)."""
    queue = Queue(unique, Exchange(unique, "direct"), routing_key=unique)
    url = fresh_mosquitto.plain_url

    def publish(body: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                with Connection(url) as producer_conn:
                    Producer(producer_conn).publish(body, exchange=queue.exchange, routing_key=unique)
                return
            except kombu_mqtt.NoSubscribersError:  # the consumer has not resubscribed yet
                assert time.monotonic() < deadline, "consumer never resubscribed"
                drain_quietly(first, 0.2)

    first = Connection(url, transport_options={"client_id": f"{unique}-w"})
    second = Connection(url, transport_options={"client_id": f"{unique}-w"})
    held: list = []
    try:
        first.connect()
        with Consumer(first, [queue], callbacks=[lambda body, msg: held.append(msg)], prefetch_count=1):
            drain_quietly(first, 0.2)
            publish("old")
            drain_until(first, lambda: len(held) == 1)
            fresh_mosquitto.restart()  # in-memory broker: the session is gone
            publish("new")
            drain_quietly(first, 0.3)  # "new" waits behind the prefetch gate
            held[0].ack()
            drain_until(first, lambda: len(held) == 2)
            assert held[1].payload == "new"  # running, not acked yet ... and the worker dies here
        # Another process takes the session over: the broker must still hold "new" unacked.
        got: list = []
        second.connect()
        with Consumer(second, [queue], callbacks=[lambda body, msg: (got.append(body), msg.ack())], prefetch_count=1):
            drain_until(second, lambda: got == ["new"])
    finally:
        second.release()
        first.release()


def subscribed_offline_queue(connect, unique: str) -> tuple[Queue, dict[str, str]]:
    """A direct queue whose consumer made its persistent session and subscription, then left:
    what is published now waits for it on the broker."""
    queue = Queue(unique, Exchange(unique, "direct"), routing_key=unique)
    consumer_session = {"client_id": f"{unique}-c"}
    first = connect(**consumer_session)
    with Consumer(first, [queue], callbacks=[lambda body, msg: msg.ack()], prefetch_count=1):
        drain_quietly(first, 0.2)
    first.release()
    return queue, consumer_session


def receive_all(connect, consumer_session: dict[str, str], queue: Queue, count: int) -> set[int]:
    """Come back with `consumer_session` and collect the `i` of every message, up to `count`."""
    got: set[int] = set()
    conn = connect(**consumer_session)
    try:
        with Consumer(conn, [queue], callbacks=[lambda body, msg: (got.add(body["i"]), msg.ack())], prefetch_count=100):
            drain_until(conn, lambda: len(got) == count, timeout=60)
    finally:
        conn.release()
    return got


def test_closing_a_producer_loses_none_of_its_unawaited_publishes(connect, unique) -> None:
    """QoS 1 publishes not awaited (delivery_mode=1) are settled before the socket closes:
    unread PUBACKs in its receive buffer made the close an RST, and the broker dropped the
    tail of the stream it had received but not yet read (12 of 3,000 seen)."""
    queue, consumer_session = subscribed_offline_queue(connect, unique)
    count, pad = 3000, "x" * 3000
    producer_conn = connect()
    producer = Producer(producer_conn)
    for i in range(count):
        producer.publish({"i": i, "pad": pad}, exchange=queue.exchange, routing_key=unique, delivery_mode=1)
    producer_conn.release()  # right after the last publish
    assert receive_all(connect, consumer_session, queue, count) == set(range(count))


def test_transient_publishes_are_confirmed_together_and_all_arrive(connect, unique) -> None:
    """`confirm_publishes` returns once the broker acknowledged every transient publish
    since the last call: one wait for a batch instead of a round trip per message."""
    queue, consumer_session = subscribed_offline_queue(connect, unique)
    producer_conn = connect()
    try:
        producer = Producer(producer_conn)
        for i in range(500):
            producer.publish({"i": i}, exchange=queue.exchange, routing_key=unique, delivery_mode=1)
        assert producer_conn.transport.confirm_publishes(timeout=30) == 0  # all confirmed, all routed
        assert producer_conn.transport._ephemeral.session._unacked == 0  # every PUBACK was read
        for i in range(3):  # to a queue nobody subscribes: counted, not raised
            producer.publish({"i": i}, exchange=queue.exchange, routing_key=f"{unique}-nobody", delivery_mode=1)
        assert producer_conn.transport.confirm_publishes(timeout=30) == 3
        assert producer_conn.transport.confirm_publishes(timeout=0.01) == 0  # nothing new: returns at once
    finally:
        producer_conn.release()
    assert receive_all(connect, consumer_session, queue, 500) == set(range(500))


def test_confirm_publishes_raises_when_the_connection_was_lost_since_the_first(fresh_mosquitto) -> None:
    """A transient publish sent before a reconnect may be lost with the old socket: the
    batch cannot be confirmed, so the producer is told to send it again."""
    with Connection(fresh_mosquitto.plain_url) as conn:
        producer = Producer(conn)
        producer.publish({"x": 1}, exchange="", routing_key="q", delivery_mode=1)
        fresh_mosquitto.restart()
        producer.publish({"x": 2}, exchange="", routing_key="q", delivery_mode=1)  # reconnects
        with pytest.raises(kombu_mqtt.MqttConnectionError, match="send them again"):
            conn.transport.confirm_publishes(timeout=10)
        producer.publish({"x": 3}, exchange="", routing_key="q", delivery_mode=1)
        conn.transport.confirm_publishes(timeout=10)  # a new batch on the new socket confirms
