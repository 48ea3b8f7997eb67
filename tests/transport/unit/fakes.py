"""A fake MQTT 5 broker and a fake paho client, for fast transport tests without Mosquitto.

Why fakes in addition to the real broker: acks, the prefetch gate, reconnects and
Subscription Identifier mapping depend on the order of packets, which a real broker
makes hard to control. Here the test decides what the broker sends and when, and
reads back what the client sent (the broker keeps an event log).

What is modelled: persistent sessions (clean_start, session_present, redelivery of
unacked messages with DUP and their original packet id), shared subscriptions
(one member per group), Subscription Identifiers, PUBACK reason 0x10, and a TLS-like
buffer: the broker sends packets in *records*; reading a record's one byte from the
kernel socket moves all of its packets into a buffer that `pending()` reports and
that select/epoll cannot see (like decrypted bytes in an SSL object).
"""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as paho

SUCCESS = paho.MQTT_ERR_SUCCESS
CONN_LOST = paho.MQTT_ERR_CONN_LOST
NO_CONN = paho.MQTT_ERR_NO_CONN


@dataclass
class FakeMessage:
    topic: str
    payload: bytes
    qos: int = 1
    mid: int = 0
    dup: bool = False
    properties: Any = None


class FakeSocket:
    """The client end of a socketpair plus a TLS-like buffer of already-read packets."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.buffered: deque[tuple[Any, ...]] = deque()

    def fileno(self) -> int:
        return self.sock.fileno()

    def pending(self) -> int:
        return len(self.buffered)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Session:
    """Broker-side state of one client id."""

    client_id: str
    subscriptions: dict[str, int] = field(default_factory=dict)  # filter -> subscription id
    inflight: dict[int, FakeMessage] = field(default_factory=dict)  # mid -> message sent, not acked
    queued: deque[FakeMessage] = field(default_factory=deque)  # waiting for the client to connect
    next_mid: int = 1
    client: FakeClient | None = None
    persistent: bool = False


class FakeBroker:
    """In-memory MQTT 5 broker; every client packet is logged in `events`."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.events: list[tuple[Any, ...]] = []
        self.record_size = 1  # packets per TLS-like record
        self.hold = False  # True: keep packets for clients until flush()
        self._held: list[tuple[FakeClient, tuple[Any, ...]]] = []

    # -- used by FakeClient -------------------------------------------------------
    def connect(self, client: FakeClient, clean_start: bool, session_expiry: int) -> None:
        session = self.sessions.get(client.client_id)
        present = session is not None and not clean_start
        if session is None or clean_start:
            session = self.sessions[client.client_id] = Session(client.client_id)
        old = session.client
        if old is not None and old is not client:
            old.lose()
        session.client = client
        session.persistent = session_expiry > 0
        self.events.append(("connect", client.client_id, clean_start, present))
        self._send(client, ("connack", present, 0))
        for mid, message in sorted(session.inflight.items()):
            self._send(client, ("publish", FakeMessage(message.topic, message.payload, 1, mid, True, message.properties)))
        while session.queued:
            self._deliver(session, session.queued.popleft())

    def disconnect(self, client: FakeClient) -> None:
        session = self.sessions.get(client.client_id)
        self.events.append(("disconnect", client.client_id))
        if session is not None and session.client is client:
            session.client = None
            if not session.persistent:
                del self.sessions[client.client_id]

    def publish(self, client: FakeClient, topic: str, payload: bytes, qos: int, mid: int) -> None:
        self.events.append(("publish", client.client_id, topic, payload))
        matched = self.route(topic, payload)
        if qos:
            self._send(client, ("puback", mid, 0 if matched else 0x10))

    def subscribe(self, client: FakeClient, topic_filter: str, ident: int, mid: int) -> None:
        self.events.append(("subscribe", client.client_id, topic_filter, ident))
        self.sessions[client.client_id].subscriptions[topic_filter] = ident
        self._send(client, ("suback", mid, [0]))

    def unsubscribe(self, client: FakeClient, topic_filter: str, mid: int) -> None:
        self.events.append(("unsubscribe", client.client_id, topic_filter))
        self.sessions[client.client_id].subscriptions.pop(topic_filter, None)
        self._send(client, ("unsuback", mid, [0]))

    def ack(self, client: FakeClient, mid: int) -> None:
        session = self.sessions[client.client_id]
        message = session.inflight.pop(mid, None)
        self.events.append(("puback", client.client_id, mid, message.payload if message else None))

    # -- used by tests --------------------------------------------------------------
    def route(self, topic: str, payload: bytes) -> int:
        """Deliver to every plain subscriber and one member per shared group; return how many."""
        groups: set[str] = set()
        matched = 0
        for session in list(self.sessions.values()):
            ids = []
            for topic_filter, ident in session.subscriptions.items():
                plain = topic_filter
                if topic_filter.startswith("$share/"):
                    group, plain = topic_filter.split("/", 2)[1:]
                    if not paho.topic_matches_sub(plain, topic) or (group, plain) in groups:
                        continue
                    groups.add((group, plain))  # type: ignore[arg-type]
                if paho.topic_matches_sub(plain, topic):
                    ids.append(ident)
            if ids:
                matched += 1
                self._deliver(session, FakeMessage(topic, payload, 1, 0, False, SimpleNamespace(SubscriptionIdentifier=ids)))
        return matched

    def send_to(self, client_id: str, topic: str, payload: bytes, ids: list[int]) -> int:
        """Send one message with these Subscription Identifiers to a client; return its mid."""
        session = self.sessions[client_id]
        return self._deliver(session, FakeMessage(topic, payload, 1, 0, False, SimpleNamespace(SubscriptionIdentifier=ids)))

    def drop(self, client_id: str) -> None:
        """The network goes away under a connected client (the session stays)."""
        session = self.sessions[client_id]
        if session.client is not None:
            session.client.lose()
            session.client = None

    def forget(self, client_id: str) -> None:
        """A broker restart without persistence: the session is gone."""
        self.drop(client_id)
        del self.sessions[client_id]

    def flush(self) -> None:
        """Send held packets, `record_size` packets per record."""
        self.hold = False
        held, self._held = self._held, []
        by_client: dict[int, tuple[FakeClient, list[tuple[Any, ...]]]] = {}
        for client, packet in held:
            by_client.setdefault(id(client), (client, []))[1].append(packet)
        for client, packets in by_client.values():
            for start in range(0, len(packets), self.record_size):
                client.receive_record(packets[start : start + self.record_size])

    def pubacks(self, client_id: str) -> list[bytes]:
        return [event[3] for event in self.events if event[0] == "puback" and event[1] == client_id]

    # -- internals ---------------------------------------------------------------------
    def _deliver(self, session: Session, message: FakeMessage) -> int:
        if session.client is None:
            session.queued.append(message)
            return 0
        mid = session.next_mid
        while mid in session.inflight:
            mid = mid % 65535 + 1
        session.next_mid = mid % 65535 + 1
        sent = FakeMessage(message.topic, message.payload, 1, mid, False, message.properties)
        session.inflight[mid] = sent
        self._send(session.client, ("publish", sent))
        return mid

    def _send(self, client: FakeClient, packet: tuple[Any, ...]) -> None:
        if self.hold:
            self._held.append((client, packet))
        else:
            client.receive_record([packet])


class FakeClient:
    """The subset of paho.mqtt.client.Client (2.x, VERSION2 callbacks) that kombu_mqtt uses."""

    def __init__(self, broker: FakeBroker, *, client_id: str = "", manual_ack: bool = False, **_: Any) -> None:
        self.broker = broker
        self.client_id = client_id
        self.manual_ack = manual_ack
        self.on_connect: Any = None
        self.on_message: Any = None
        self.on_publish: Any = None
        self.on_subscribe: Any = None
        self.on_unsubscribe: Any = None
        self.on_disconnect: Any = None
        self._sock: FakeSocket | None = None
        self._peer: socket.socket | None = None
        self._records: deque[list[tuple[Any, ...]]] = deque()
        self._connected = False
        self._mid = 0

    # -- configuration (ignored) ---------------------------------------------------------
    def max_inflight_messages_set(self, value: int) -> None: ...
    def max_queued_messages_set(self, value: int) -> None: ...
    def tls_set_context(self, context: Any) -> None: ...
    def username_pw_set(self, username: str | None, password: str | None = None) -> None: ...

    # -- connection ------------------------------------------------------------------------
    def connect(self, host: str, port: int, keepalive: int = 60, clean_start: bool = True, properties: Any = None) -> int:
        ours, theirs = socket.socketpair()
        self._sock, self._peer = FakeSocket(ours), theirs
        self._connected = True
        self.receive_maximum = getattr(properties, "ReceiveMaximum", None)
        self.broker.connect(self, clean_start, getattr(properties, "SessionExpiryInterval", 0))
        return SUCCESS

    def is_connected(self) -> bool:
        return self._connected

    def socket(self) -> FakeSocket | None:
        return self._sock

    def disconnect(self) -> int:
        if self._connected:
            self._connected = False
            self.broker.disconnect(self)
        return SUCCESS

    def lose(self) -> None:
        """Broker side closes the connection: the client reads EOF next."""
        if self._peer is not None:
            self._peer.close()
            self._peer = None

    def receive_record(self, packets: list[tuple[Any, ...]]) -> None:
        if self._peer is None:
            return
        self._records.append(packets)
        self._peer.send(b"\0")

    # -- I/O ---------------------------------------------------------------------------------
    def loop_read(self, max_packets: int = 1) -> int:
        sock = self._sock
        if sock is None:
            return NO_CONN
        if not sock.buffered:
            try:
                data = sock.sock.recv(1)
            except BlockingIOError:
                return SUCCESS
            except OSError:
                data = b""
            if not data:
                self._connected = False
                return CONN_LOST
            sock.buffered.extend(self._records.popleft())
        self._handle(sock.buffered.popleft())
        return SUCCESS

    def loop_write(self) -> int:
        return SUCCESS if self._sock is not None else NO_CONN

    def loop_misc(self) -> int:
        return SUCCESS if self._connected else NO_CONN

    def want_write(self) -> bool:
        return False

    def _handle(self, packet: tuple[Any, ...]) -> None:
        kind = packet[0]
        if kind == "connack":
            self.on_connect(self, None, SimpleNamespace(session_present=packet[1]), SimpleNamespace(value=packet[2]), None)
        elif kind == "publish":
            self.on_message(self, None, packet[1])
        elif kind == "puback":
            self.on_publish(self, None, packet[1], SimpleNamespace(value=packet[2]), None)
        elif kind == "suback":
            self.on_subscribe(self, None, packet[1], [SimpleNamespace(value=c) for c in packet[2]], None)
        elif kind == "unsuback":
            self.on_unsubscribe(self, None, packet[1], [SimpleNamespace(value=c) for c in packet[2]], None)

    # -- operations ----------------------------------------------------------------------
    def _next_mid(self) -> int:
        self._mid = self._mid % 65535 + 1
        return self._mid

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> Any:
        if not self._connected:
            return SimpleNamespace(rc=NO_CONN, mid=0)
        mid = self._next_mid()
        self.broker.publish(self, topic, bytes(payload), qos, mid)
        return SimpleNamespace(rc=SUCCESS, mid=mid)

    def subscribe(self, topic_filter: str, options: Any = None, properties: Any = None) -> tuple[int, int]:
        mid = self._next_mid()
        ident = properties.SubscriptionIdentifier  # paho's Properties keep it as a list
        self.broker.subscribe(self, topic_filter, ident[0] if isinstance(ident, list) else ident, mid)
        return SUCCESS, mid

    def unsubscribe(self, topic_filter: str) -> tuple[int, int]:
        mid = self._next_mid()
        self.broker.unsubscribe(self, topic_filter, mid)
        return SUCCESS, mid

    def ack(self, mid: int, qos: int) -> int:
        if self._connected:
            self.broker.ack(self, mid)
        return SUCCESS
