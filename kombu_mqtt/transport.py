"""kombu Transport + Channel over MQTT 5 (paho-mqtt 2.x).

Design (details in docs/INTERFACES.md and the README section of kombu_mqtt/__init__.py):

* Routing happens in the broker: a queue's bindings become subscriptions
  (`$share/<queue>/...` for direct/topic, a plain subscription for fanout), and an
  incoming message is mapped back to its queue(s) by its Subscription Identifier.
* Each kombu Connection owns one *ephemeral* MQTT session (random client id, clean
  start) used for publishing and for ephemeral queues (rpc replies, pidbox, events).
  Durable queues are subscribed only when consumed, on a second *durable* session
  (stable client id, ``clean_start=False``, session expiry), so unacked tasks are
  redelivered after a crash and nothing else lands in that persistent session.
  A producer that merely declares a durable queue never joins its share group.
* Ephemeral queues are subscribed when declared (Celery declares the rpc reply queue
  on the producer's connection before publishing); when another connection of the
  same process later consumes that queue, it subscribes and takes the queue over
  (the first connection unsubscribes and hands its buffered messages on).
* Acks are broker acks (manual PUBACK); prefetch is enforced by a local gate plus
  Receive Maximum on the durable session. Requeue = republish then ack.
* Event driven: with a kombu Hub the session sockets are readers, paho writes
  directly (no WRITE interest on the read fd; a dup()ed fd is used if a write
  ever blocks), and one timer at keepalive/3 handles pings.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import select
import socket
import ssl
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from queue import Empty
from typing import Any, cast

from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.utils.json import dumps

from . import topics
from .backoff import Backoff
from .client import NO_MATCHING_SUBSCRIBERS, Endpoint, MqttSession, build_tls_context, tls_buffered
from .deadletter import NOT_KOMBU_MESSAGE, STALE_SUBSCRIPTION, DeadLetterBox, resolve_handler
from .errors import (
    MqttConnectionError,
    NoSubscribersError,
    PublishNotSentError,
    PublishRejectedError,
    SubscribeRejectedError,
)
from .hub import HubBinding
from .options import TransportOptions
from .takeover import PAUSE_MIN

logger = logging.getLogger(__name__)

_REGISTRY_LOCK = threading.Lock()
#: (host, port, prefix, queue) -> the Transport in this process that subscribes an ephemeral queue
_EPHEMERAL_OWNERS: dict[tuple[str, int, str, str], weakref.ref[Transport]] = {}
# A forked child (prefork pool) must never touch its parent's sockets.
os.register_at_fork(after_in_child=_EPHEMERAL_OWNERS.clear)


@dataclass
class AckRef:
    """One incoming MQTT message; acked on the broker when all its copies are settled."""

    session: MqttSession
    mid: int
    generation: int
    topic: str
    copies: int = 1
    done: bool = False

    def settle(self) -> bool:
        """Count one copy settled; True when the broker ack was sent now."""
        self.copies -= 1
        if self.copies > 0 or self.done:
            return False
        self.done = True
        if self.mid:
            self.session.ack(self.mid, self.generation)
        return True


@dataclass
class Refusal:
    """A message the transport will not deliver, waiting for the dead-letter handler."""

    queue: str
    topic: str
    payload: bytes
    reason: str
    detail: str
    ref: AckRef
    attempts: int = 0  # failed handler calls so far
    due: float = 0.0  # monotonic time of the next attempt


@dataclass
class Delivery:
    queue: str
    payload: dict[str, Any]
    ref: AckRef


@dataclass
class SessionState:
    """Subscriptions held by one MQTT session."""

    session: MqttSession
    durable: bool
    filters: dict[str, set[str]] = field(default_factory=dict)  # filter -> queues
    ids: dict[str, int] = field(default_factory=dict)  # filter -> subscription id
    by_id: dict[int, str] = field(default_factory=dict)
    unrouted: dict[int, list[Any]] = field(default_factory=dict)  # sub id -> messages waiting for a filter
    ready: bool = False  # durable session: consumed queues are subscribed; unknown ids are stale


def _is_ephemeral(meta: dict[str, Any] | None) -> bool:
    if meta is None:
        return False
    return bool(meta.get("auto_delete") or meta.get("exclusive") or not meta.get("durable", True))


class QoS(virtual.QoS):
    """Prefetch gate + broker acks (virtual QoS only keeps local bookkeeping)."""

    channel: Channel

    def ack(self, delivery_tag: str) -> None:
        self._quick_ack(delivery_tag)
        self.channel.settle_tag(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            try:
                message = self.get(delivery_tag)
            except KeyError:  # the closing channel already put it back
                message = None
            if message is not None:
                self.channel._restore(message)
        else:
            self.channel.settle_tag(delivery_tag)
        self._quick_ack(delivery_tag)


class Channel(virtual.Channel):
    """A kombu channel whose exchanges and queues live in the MQTT broker."""

    QoS = QoS
    supports_fanout = True
    do_restore = True

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._tags: dict[str, AckRef] = {}  # delivery tag -> broker ack handle

    @property
    def transport(self) -> Transport:
        return self.connection

    # -- declarations -------------------------------------------------------
    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self.transport.declare_queue(queue, kwargs)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return True

    def track(self, delivery_tag: str, ref: AckRef) -> None:
        """Remember which broker message a delivery tag acks."""
        self._tags[delivery_tag] = ref

    def _size(self, queue: str) -> int:
        return self.transport.buffered_count(queue)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        self.transport.bind_queue(queue, exchange, routing_key)

    def queue_unbind(self, queue: str, exchange: str | None = None, routing_key: str = "", arguments: Any = None, **kwargs: Any) -> None:
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        self.transport.unbind_queue(queue, exchange or "amq.direct", routing_key)

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any) -> None:
        if if_empty and self._size(queue):
            return
        self.transport.drop_queue(queue)
        self.state.queue_bindings_delete(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self.transport.drop_queue(queue)

    def _purge(self, queue: str) -> int:
        """Drop the messages buffered locally (MQTT cannot purge the broker side)."""
        return self.transport.purge_buffered(queue)

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        delivery = self.transport.take_buffered(queue)
        if delivery is None:
            raise Empty()
        self.track(delivery.payload["properties"]["delivery_tag"], delivery.ref)
        return delivery.payload

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any):
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self.settle_tag(message.delivery_tag)
        return message

    # -- publishing ---------------------------------------------------------
    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self.transport.publish_message(topics.publish_topic(self.transport.prefix, "", "direct", queue), message, "direct")

    def basic_publish(self, message: dict[str, Any], exchange: str, routing_key: str, **kwargs: Any) -> None:
        self._inplace_augment_message(message, exchange, routing_key)
        exchange_type = self.typeof(exchange).type if exchange else "direct"
        topic = topics.publish_topic(self.transport.prefix, exchange, exchange_type, routing_key or "")
        self.transport.publish_message(topic, message, exchange_type)

    # -- consuming ------------------------------------------------------------
    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any) -> str:
        super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        self.transport.start_consuming(queue, self, no_ack)
        return consumer_tag

    def basic_cancel(self, consumer_tag: str) -> None:
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self.transport.stop_consuming(queue, closing=self.closed)

    def basic_qos(self, prefetch_size: int = 0, prefetch_count: int = 0, apply_global: bool = False) -> None:
        super().basic_qos(prefetch_size, prefetch_count, apply_global)
        self.transport.prefetch_changed(self)

    def settle_tag(self, delivery_tag: str) -> None:
        """The consumer is done with a delivery (ack or reject without requeue).

        On a closed channel this does nothing: its transport is gone and the broker,
        which never got the ack, redelivers the message to the resumed session."""
        ref = self._tags.pop(delivery_tag, None)
        transport = self.connection
        if transport is None:
            return
        if ref is not None:
            transport.settle(ref)
        transport.schedule_delivery()

    def _restore(self, message: Any) -> None:
        """Requeue = republish to the original topic (marked redelivered), then ack.
        On a closed channel nothing can be republished: the broker redelivers it."""
        ref = self._tags.pop(message.delivery_tag, None)
        if ref is None or self.connection is None:
            return
        payload = message.serializable()
        payload["redelivered"] = True
        payload["properties"].setdefault("delivery_info", {})["redelivered"] = True
        try:
            self.transport.publish_message(ref.topic, payload, "fanout", wait=True)
        except (MqttConnectionError, OSError) as exc:
            logger.info("cannot requeue message on %s (%s): the broker redelivers it to a resumed session", ref.topic, exc)
            return
        self.transport.settle(ref)

    def _restore_at_beginning(self, message: Any) -> None:
        self._restore(message)

    def close(self) -> None:
        if not self.closed and self.connection is not None and not self.transport.session_alive():
            # nothing can be republished: unacked messages come back from the broker
            if self._qos is not None:
                self._qos.restore_at_shutdown = False
        super().close()


ChannelType = Channel  # `Channel` inside Transport's body is its class attribute


class Transport(virtual.Transport):
    """kombu transport for `mqtt://host:1883`."""

    Channel = Channel
    # kombu's base class declares these as None / a 1-tuple, so mypy infers those types.
    default_port = 1883  # type: ignore[assignment]
    driver_type = "mqtt"
    driver_name = "paho-mqtt"
    polling_interval = None  # type: ignore[assignment]
    use_tls = False

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    connection_errors = (MqttConnectionError, ConnectionError, OSError, ssl.SSLError)  # type: ignore[assignment]
    channel_errors = (ChannelError, PublishRejectedError, SubscribeRejectedError)  # type: ignore[assignment]

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.polling_interval = None
        self.options = TransportOptions.from_mapping(client.transport_options)
        self.prefix = self.options.topic_prefix
        self._queue_meta: dict[str, dict[str, Any]] = {}
        self._buffers: dict[str, deque[Delivery]] = {}
        self._consumers: dict[str, tuple[ChannelType, bool]] = {}  # queue -> (channel, no_ack)
        self._owned_ephemeral: set[str] = set()
        self._pending_durable: set[str] = set()
        self._inflight: dict[tuple[int, int], AckRef] = {}
        self._tag_counter = itertools.count(1)
        self._delivering = False
        self._loop: HubBinding | None = None  # set while registered with a kombu Hub
        self.dead_letter_box = DeadLetterBox(resolve_handler(self.options.dead_letter_handler), self.options.deadletter_keep)
        self._refused: deque[Refusal] = deque()
        self._refusal_retries: list[Refusal] = []  # handler failed: retried when due, unacked meanwhile
        self._endpoint: Endpoint | None = None
        self._ephemeral: SessionState | None = None
        self._durable: SessionState | None = None
        self._closed = False

    @property
    def dead_letters(self) -> deque[tuple[str, bytes]]:
        """The last refused messages as (queue, payload), newest last (option deadletter_keep)."""
        return self.dead_letter_box.kept

    @property
    def dead_letter_counts(self) -> dict[str, int]:
        """Refused messages per reason since this transport was created."""
        return dict(self.dead_letter_box.counts)

    # -- kombu Hub (see kombu_mqtt.hub) ---------------------------------------------
    @property
    def tick_interval(self) -> float:
        return max(1.0, self.options.keepalive / 3)

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        if self._loop is not None and self._loop.loop is not loop:
            self._loop.unregister()
            self._loop = None
        if self._loop is None:
            self._loop = HubBinding(self, loop)
        self._loop.register()

    def unregister_from_event_loop(self, connection: Any, loop: Any) -> None:
        if self._loop is not None:
            self._loop.unregister()
            self._loop = None

    def has_work(self) -> bool:
        return bool(self._buffers or self._pending_durable or self._refused or self._retry_due(time.monotonic()))

    def _retry_due(self, now: float) -> bool:
        return any(refusal.due <= now for refusal in self._refusal_retries)

    def run_ready(self) -> None:
        self._apply_pending()
        self._deliver_ready()

    def schedule_delivery(self) -> None:
        """Make the Hub hand out buffered messages soon (no-op without a Hub: drain_events loops)."""
        if self._loop is not None:
            self._loop.kick()

    # -- buffered messages (the channel's view) ---------------------------------------
    def buffered_count(self, queue: str) -> int:
        return len(self._buffers.get(queue, ()))

    def take_buffered(self, queue: str) -> Delivery | None:
        buffered = self._buffers.get(queue)
        return buffered.popleft() if buffered else None

    def purge_buffered(self, queue: str) -> int:
        """Drop (and ack) what this connection holds for `queue`; the broker side cannot be purged."""
        buffered = self._buffers.pop(queue, deque())
        for delivery in buffered:
            self.settle(delivery.ref)
        return len(buffered)

    # -- connection -------------------------------------------------------------
    def _make_endpoint(self) -> Endpoint:
        conninfo: Any = self.client
        ssl_option = conninfo.ssl
        tls = None
        if ssl_option or self.use_tls:
            tls = build_tls_context(ssl_option if ssl_option else True)
        return Endpoint(
            host=conninfo.hostname or "localhost",
            port=int(conninfo.port or self.default_port),
            tls=tls,
            username=conninfo.userid or None,
            password=conninfo.password or None,
        )

    def _new_session(self, durable: bool) -> SessionState:
        opts = self.options
        holder: dict[str, SessionState] = {}
        if self._endpoint is None:
            raise MqttConnectionError("MQTT transport is not connected: call Connection.connect() first")
        session = MqttSession(
            self._endpoint,
            on_message=lambda message: self._on_message(holder["state"], message),
            keepalive=opts.keepalive,
            max_inflight=opts.max_inflight,
            connect_timeout=opts.connect_timeout,
            reconnect_timeout=opts.reconnect_timeout,
            reconnect_min_delay=opts.reconnect_min_delay,
            reconnect_max_delay=opts.reconnect_max_delay,
        )
        state = holder["state"] = SessionState(session=session, durable=durable)
        session.on_connected = lambda present: self._on_session_connected(state, present)
        if durable:  # the only connection with a fixed client id: the only one another client can take over
            session.on_takeover = opts.on_takeover or _log_only
        return state

    def establish_connection(self) -> Transport:
        self._endpoint = self._make_endpoint()
        self._ephemeral = self._new_session(durable=False)
        self._ephemeral.session.connect(MqttSession.random_client_id(self.prefix), clean_start=True)
        return super().establish_connection()

    def verify_connection(self, connection: Any) -> bool:
        return self.session_alive()

    def session_alive(self) -> bool:
        return self._ephemeral is not None and self._ephemeral.session.connected

    def close_connection(self, connection: Any) -> None:
        if self._closed:
            return
        try:
            super().close_connection(connection)
        finally:
            self._closed = True
            if self._loop is not None:
                self.unregister_from_event_loop(connection, self._loop.loop)
            with _REGISTRY_LOCK:
                for queue in self._owned_ephemeral:
                    key = self._owner_key(queue)
                    ref = _EPHEMERAL_OWNERS.get(key)
                    if ref is not None and ref() is self:
                        del _EPHEMERAL_OWNERS[key]
                self._owned_ephemeral.clear()
            for state in (self._durable, self._ephemeral):
                if state is not None:
                    state.session.close(settle_timeout=self.options.publish_timeout)

    def driver_version(self) -> str:
        import paho.mqtt

        return paho.mqtt.__version__

    # -- declarations and subscriptions ---------------------------------------
    def _owner_key(self, queue: str) -> tuple[str, int, str, str]:
        endpoint = self._endpoint
        return (endpoint.host if endpoint else "", endpoint.port if endpoint else 0, self.prefix, queue)

    def _queue_filters(self, queue: str) -> set[str]:
        filters = {topics.default_filter(self.prefix, queue)}
        for exchange, routing_key, _args in self.state.queue_bindings(queue):
            exchange_type = self.state.exchanges.get(exchange, {}).get("type", "direct")
            filters.add(topics.binding_filter(self.prefix, queue, exchange, exchange_type, routing_key))
        return filters

    def _state_for(self, queue: str) -> SessionState | None:
        """The session that holds (or should hold) `queue`'s subscriptions, if any."""
        if queue in self._owned_ephemeral:
            return self._ephemeral
        if queue in self._consumers and not _is_ephemeral(self._queue_meta.get(queue)):
            return self._durable
        return None

    def declare_queue(self, queue: str, meta: dict[str, Any]) -> None:
        self._queue_meta.setdefault(queue, dict(meta))
        if _is_ephemeral(self._queue_meta[queue]):
            self._claim_ephemeral(queue, take_over=False)

    def _claim_ephemeral(self, queue: str, take_over: bool) -> None:
        """Subscribe an ephemeral queue here unless another live connection of this process does."""
        if queue in self._owned_ephemeral:
            return
        key = self._owner_key(queue)
        with _REGISTRY_LOCK:
            ref = _EPHEMERAL_OWNERS.get(key)
            owner = ref() if ref is not None else None
            if owner is not None and (owner._closed or not owner.session_alive()):
                owner = None
            if owner is not None and not take_over:
                return
            _EPHEMERAL_OWNERS[key] = weakref.ref(self)
        if self._ephemeral is None:
            raise MqttConnectionError("MQTT transport is not connected: call Connection.connect() first")
        self._owned_ephemeral.add(queue)
        self._subscribe_queue(self._ephemeral, queue)
        if owner is not None and owner is not self:
            owner._release_ephemeral(queue, to=self)

    def _release_ephemeral(self, queue: str, to: Transport) -> None:
        """Stop subscribing `queue` and hand buffered messages to `to` (another thread may call this)."""
        state = self._ephemeral
        if state is None:
            return
        with state.session.lock:
            self._owned_ephemeral.discard(queue)
            try:
                self._unsubscribe_queue(state, queue)
            except MqttConnectionError:
                pass
            moved = self._buffers.pop(queue, deque())
        if moved:
            to._buffers.setdefault(queue, deque()).extend(moved)
            to.schedule_delivery()

    def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        state = self._state_for(queue)
        if state is None:
            return
        exchange_type = self.state.exchanges.get(exchange, {}).get("type", "direct")
        self._subscribe_filter(state, topics.binding_filter(self.prefix, queue, exchange, exchange_type, routing_key), queue)

    def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        state = self._state_for(queue)
        if state is None:
            return
        exchange_type = self.state.exchanges.get(exchange, {}).get("type", "direct")
        self._unsubscribe_filter(state, topics.binding_filter(self.prefix, queue, exchange, exchange_type, routing_key), queue)

    def drop_queue(self, queue: str) -> None:
        for state in (self._ephemeral, self._durable):
            if state is not None and state.session.connected:
                self._unsubscribe_queue(state, queue)
        if queue in self._owned_ephemeral:
            self._owned_ephemeral.discard(queue)
            with _REGISTRY_LOCK:
                ref = _EPHEMERAL_OWNERS.get(self._owner_key(queue))
                if ref is not None and ref() is self:
                    del _EPHEMERAL_OWNERS[self._owner_key(queue)]
        for delivery in self._buffers.pop(queue, ()):
            self.settle(delivery.ref)

    def _subscribe_queue(self, state: SessionState, queue: str) -> None:
        for topic_filter in sorted(self._queue_filters(queue)):
            self._subscribe_filter(state, topic_filter, queue)

    def _unsubscribe_queue(self, state: SessionState, queue: str) -> None:
        for topic_filter in [f for f, queues in state.filters.items() if queue in queues]:
            self._unsubscribe_filter(state, topic_filter, queue)

    def _subscribe_filter(self, state: SessionState, topic_filter: str, queue: str) -> None:
        queues = state.filters.get(topic_filter)
        if queues is not None:
            queues.add(queue)
            return
        ident = topics.subscription_id(topic_filter, set(state.by_id))
        state.filters[topic_filter] = {queue}
        state.ids[topic_filter] = ident
        state.by_id[ident] = topic_filter
        state.session.subscribe(topic_filter, ident)
        waiting = state.unrouted.pop(ident, None)
        for message in waiting or ():
            self._route(state, message)

    def _unsubscribe_filter(self, state: SessionState, topic_filter: str, queue: str) -> None:
        queues = state.filters.get(topic_filter)
        if queues is None or queue not in queues:
            return
        if len(queues) == 1 and state.session.connected:
            # Keep the mapping until UNSUBACK: messages read meanwhile still find the queue.
            state.session.unsubscribe(topic_filter)
        queues.discard(queue)
        if queues:
            return
        del state.filters[topic_filter]
        ident = state.ids.pop(topic_filter)
        state.by_id.pop(ident, None)

    def _on_session_connected(self, state: SessionState, session_present: bool) -> None:
        """Re-subscribe after a reconnect (a resumed session keeps them; SUBSCRIBE is idempotent)."""
        for topic_filter, ident in list(state.ids.items()):
            state.session.subscribe(topic_filter, ident)
        if self._loop is not None:
            self._loop.sync_readers()

    # -- consuming ----------------------------------------------------------------
    def start_consuming(self, queue: str, channel: ChannelType, no_ack: bool) -> None:
        self._consumers[queue] = (channel, no_ack)
        if queue not in self._queue_meta:
            self._queue_meta[queue] = {"durable": True, "auto_delete": False}
        if _is_ephemeral(self._queue_meta[queue]):
            self._claim_ephemeral(queue, take_over=True)
        elif self._durable is not None and self._durable.session.connected:
            self._subscribe_queue(self._durable, queue)
        else:
            # Wait until the consumer's prefetch is known (Celery sets it right after
            # consume()), then open the durable session with a matching Receive Maximum.
            self._pending_durable.add(queue)
        self.schedule_delivery()

    def stop_consuming(self, queue: str, closing: bool) -> None:
        """Forget the consumer; a durable queue's subscription stays in the persistent session.

        Why: Celery cancels its consumers on every shutdown; unsubscribing would make
        tasks published while the worker restarts get dropped (PUBACK 0x10). Messages
        already buffered here stay unacked and come back when the session resumes.
        Use queue_delete to really leave a queue.
        """
        self._consumers.pop(queue, None)
        self._pending_durable.discard(queue)

    def _durable_client_id(self, queues: set[str]) -> str:
        if self.options.client_id:
            return self.options.client_id
        digest = hashlib.sha1(",".join(sorted(queues)).encode()).hexdigest()[:10]
        return f"{self.prefix}-{socket.gethostname()}-{digest}"

    def _receive_maximum(self) -> int | None:
        if self.options.receive_maximum:
            return self.options.receive_maximum
        channels = {
            id(channel): channel
            for queue, (channel, no_ack) in self._consumers.items()
            if not no_ack and not _is_ephemeral(self._queue_meta.get(queue))
        }
        counts = [channel.qos.prefetch_count for channel in channels.values()]
        if not counts or any(not count for count in counts):
            return None
        return max(1, min(65535, sum(counts)))

    def _apply_pending(self) -> None:
        """Open the durable session (once) and subscribe consumed durable queues."""
        if not self._pending_durable or self._closed:
            return
        queues = set(self._pending_durable)
        self._pending_durable.clear()
        if self._durable is None:
            self._durable = self._new_session(durable=True)
            self._durable.session.connect(
                self._durable_client_id(queues),
                clean_start=False,
                session_expiry=self.options.session_expiry,
                receive_maximum=self._receive_maximum(),
            )
        else:
            self._durable.session.ensure_connected()
        for queue in sorted(queues):
            if queue in self._consumers:
                self._subscribe_queue(self._durable, queue)
        self._durable.ready = True
        stale, self._durable.unrouted = self._durable.unrouted, {}
        for messages in stale.values():
            for message in messages:
                self._set_aside_stale(self._durable, message)
        if self._loop is not None:
            self._loop.sync_readers()
        self.schedule_delivery()

    def prefetch_changed(self, channel: ChannelType) -> None:
        """Prefetch grew past the durable session's Receive Maximum: resume it with a larger one."""
        state = self._durable
        if state is None or self.options.receive_maximum:
            return
        wanted = self._receive_maximum()
        current = state.session.receive_maximum
        if current and (wanted is None or wanted > current):
            state.session.receive_maximum = wanted
            state.session.connect(
                state.session.client_id, clean_start=False, session_expiry=self.options.session_expiry, receive_maximum=wanted
            )

    # -- incoming messages ---------------------------------------------------------
    def _on_message(self, state: SessionState, message: Any) -> None:
        """paho callback: only buffer (acks and app code run outside paho's read loop)."""
        if message.qos and message.dup:
            # A held message of a session the broker has since started anew shares only
            # its packet id with this one: dropping this as a duplicate lost tasks
            # (see MqttSession.ack for the other half of that defect).
            held = self._inflight.get((id(state.session), message.mid))
            if held is not None and not held.done and state.session.is_current(held.generation):
                return  # redelivery (after a reconnect) of a message we still hold
        self._route(state, message)

    def _route(self, state: SessionState, message: Any) -> None:
        ids = list(getattr(message.properties, "SubscriptionIdentifier", None) or [])
        queues: list[str] = []
        for ident in ids:
            topic_filter = state.by_id.get(ident)
            if topic_filter is None:
                if state.ready:
                    self._set_aside_stale(state, message)
                else:  # a resumed session redelivers before we have re-subscribed
                    state.unrouted.setdefault(ident, []).append(message)
                return
            for queue in state.filters.get(topic_filter, ()):
                if queue not in queues:
                    queues.append(queue)
        if not ids:
            logger.warning("MQTT message on %r without subscription identifier: dropped", message.topic)
        ref = AckRef(state.session, message.mid if message.qos else 0, state.session.generation, message.topic, copies=max(1, len(queues)))
        if message.qos:
            self._inflight[(id(state.session), message.mid)] = ref
        if not queues:
            self.settle(ref)
            return
        try:
            payload = json.loads(message.payload)
            if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict) or "body" not in payload:
                raise ValueError("not a kombu message envelope")
        except (ValueError, UnicodeDecodeError) as exc:
            for queue in queues:  # ref.copies == len(queues): acked once every copy is kept
                self._refuse(Refusal(queue, message.topic, bytes(message.payload), NOT_KOMBU_MESSAGE, f"payload is not a kombu message ({exc})", ref))
            return
        for index, queue in enumerate(queues):
            copy = payload if index == 0 else json.loads(message.payload)
            props = copy["properties"]
            props["delivery_tag"] = f"m{next(self._tag_counter)}"
            info = props.get("delivery_info")
            if not isinstance(info, dict):
                info = props["delivery_info"] = {}
            info["redelivered"] = bool(message.dup or copy.get("redelivered"))
            self._buffers.setdefault(queue, deque()).append(Delivery(queue, copy, ref))
        self.schedule_delivery()

    def _set_aside_stale(self, state: SessionState, message: Any) -> None:
        """A message for a subscription this process did not make (a persistent session
        reused by a worker that no longer consumes that queue): set aside and ack, or it
        would hold a Receive Maximum slot forever."""
        # The queue behind a shared subscription is unknown here: file it under its topic.
        ref = AckRef(state.session, message.mid if message.qos else 0, state.session.generation, message.topic)
        if message.qos:
            self._inflight[(id(state.session), message.mid)] = ref
        self._refuse(Refusal(
            message.topic, message.topic, bytes(message.payload), STALE_SUBSCRIPTION,
            "matches no queue this worker consumes (stale subscription in its persistent session:"
            " give the worker its own client_id or delete the old queue)",
            ref,
        ))

    def settle(self, ref: AckRef) -> None:
        """One copy of a message is done with: ack it on the broker when all copies are."""
        if ref.settle():
            self._forget(ref)

    def _forget(self, ref: AckRef) -> None:
        key = (id(ref.session), ref.mid)
        if self._inflight.get(key) is ref:  # a newer message may carry the same packet id
            del self._inflight[key]

    def _refuse(self, refusal: Refusal) -> None:
        """Queue a refused message for the dead-letter handler (run outside paho's read loop)."""
        self._refused.append(refusal)
        self.schedule_delivery()

    def _handle_refusals(self) -> None:
        """Give refused messages to the dead-letter box; ack only what it kept.

        Why outside the paho callback: the handler is application code (it may write
        a database or publish), and paho's read loop holds the session lock.
        """
        now = time.monotonic()
        if self._retry_due(now):
            self._refused.extend(r for r in self._refusal_retries if r.due <= now)
            self._refusal_retries = [r for r in self._refusal_retries if r.due > now]
        while self._refused:
            refusal = self._refused.popleft()
            ref = refusal.ref
            if ref.done:
                continue
            box = self.dead_letter_box
            if box.refuse(refusal.queue, refusal.topic, refusal.payload, refusal.reason, refusal.detail, first=not refusal.attempts):
                self.settle(ref)
                continue
            # Not kept: no ack, so the broker still has it. Retry here with backoff (the
            # ref stays in _inflight, so a DUP redelivery after a reconnect is not
            # handled twice); at prefetch 1 (Receive Maximum 1) the queue waits meanwhile.
            refusal.attempts += 1
            delay = Backoff(self.options.dead_letter_retry, self.options.dead_letter_retry_max, jitter=False).ceiling(refusal.attempts - 1)
            refusal.due = now + delay
            self._refusal_retries.append(refusal)

    def _next_retry_in(self, now: float) -> float | None:
        if not self._refusal_retries:
            return None
        return max(0.0, min(r.due for r in self._refusal_retries) - now)

    def _deliver_ready(self) -> int:
        """Hand buffered messages to consumers while their prefetch allows."""
        if self._delivering:
            return 0  # the outer loop re-checks prefetch after every message
        self._delivering = True
        delivered = 0
        try:
            self._handle_refusals()
            callbacks = cast(dict[str, Any], self._callbacks)  # kombu declares None, sets a dict in __init__
            for queue in list(self._buffers):
                buffered = self._buffers.get(queue)
                entry = self._consumers.get(queue)
                callback = callbacks.get(queue)
                if not buffered or entry is None or callback is None:
                    continue
                channel, no_ack = entry
                while buffered and (no_ack or channel.qos.can_consume()):
                    delivery = buffered.popleft()
                    ref = delivery.ref
                    if no_ack:
                        self.settle(ref)
                    else:
                        channel.track(delivery.payload["properties"]["delivery_tag"], ref)
                    delivered += 1
                    callback(delivery.payload)
                if not buffered:
                    self._buffers.pop(queue, None)
        finally:
            self._delivering = False
        return delivered

    # -- publishing ------------------------------------------------------------------
    def publish_message(self, topic: str, message: dict[str, Any], exchange_type: str, wait: bool | None = None) -> None:
        state = self._ephemeral
        if state is None:
            raise MqttConnectionError("MQTT transport is not connected: call Connection.connect() first")
        persistent = message.get("properties", {}).get("delivery_mode") == 2
        if wait is None:
            wait = persistent
        session = state.session
        # An awaited publish notices a dead socket while waiting for PUBACK (kombu
        # then retries); a fire-and-forget one must probe first, at most every 50 ms.
        session.ensure_connected(probe_interval=1e9 if wait else 0.05)
        reply_to = message.get("properties", {}).get("reply_to")
        if reply_to and isinstance(reply_to, str):
            self._ensure_reply_route(reply_to)
        payload = dumps(message).encode()
        try:
            code = session.publish(topic, payload, qos=1, wait=wait, timeout=self.options.publish_timeout)
        except PublishNotSentError:
            # The socket died after the last probe (a broker restart within probe_interval):
            # nothing reached the broker, so reconnect now and send it once more.
            session.ensure_connected()
            code = session.publish(topic, payload, qos=1, wait=wait, timeout=self.options.publish_timeout)
        if (
            code == NO_MATCHING_SUBSCRIBERS
            and persistent
            and exchange_type in ("direct", "topic")
            and self.options.no_subscribers == "raise"
        ):
            raise NoSubscribersError(topic)
        self.schedule_delivery()

    def confirm_publishes(self, timeout: float | None = None) -> int:
        """Wait until the broker acknowledged every transient publish since the last call;
        return how many of them reached no subscriber (the broker dropped those).

        A transient message (kombu `delivery_mode=1`) is not awaited one by one, so this is
        how a producer learns that a whole batch of them reached the broker: one wait for
        the lot (`MqttSession.confirm_publishes`; default bound `publish_timeout`). Raises
        MqttConnectionError (send them again) or PublishRejectedError.
        """
        state = self._ephemeral
        if state is None:
            raise MqttConnectionError("MQTT transport is not connected: call Connection.connect() first")
        return state.session.confirm_publishes(self.options.publish_timeout if timeout is None else timeout)

    def _ensure_reply_route(self, queue: str) -> None:
        """Before sending a request, make sure this process still listens on its reply queue.

        Why: after a broker restart the reply consumer notices the lost connection
        only when it next reads; a reply published before it resubscribes is dropped.
        """
        with _REGISTRY_LOCK:
            ref = _EPHEMERAL_OWNERS.get(self._owner_key(queue))
        owner = ref() if ref is not None else None
        if owner is None or owner._closed or owner._ephemeral is None:
            return
        if owner is self:
            owner._ephemeral.session.ensure_connected(probe_interval=0.05)
            return
        # Another connection of this process listens on that reply queue. Reviving it
        # is a courtesy: its failure (e.g. a forgotten, long-idle connection) must not
        # fail this publish, which has a healthy connection of its own.
        try:
            owner._ephemeral.session.ensure_connected(probe_interval=0.05)
        except (MqttConnectionError, OSError) as exc:
            logger.warning("reply queue %s: its listening connection could not be revived (%s)", queue, exc)
            return
        owner.schedule_delivery()

    # -- draining ------------------------------------------------------------------
    def sessions(self) -> list[MqttSession]:
        return [s.session for s in (self._ephemeral, self._durable) if s is not None]

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Blocking drain (producers, rpc result waiting, plain kombu consumers)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._apply_pending()
            if self._deliver_ready():
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError()
            self._wait(remaining)

    def _wait(self, timeout: float | None) -> None:
        sessions = self.sessions()
        tick = self.tick_interval
        retry = self._next_retry_in(time.monotonic())
        if retry is not None:
            tick = min(tick, retry)
        timeout = tick if timeout is None else min(timeout, tick)
        socks: dict[Any, MqttSession] = {}
        pending: list[MqttSession] = []
        for session in sessions:
            sock = session.socket()
            if sock is None:
                self._recover(session)
                return
            socks[sock] = session
            if tls_buffered(sock):
                pending.append(session)
        if not pending:
            wlist = [sock for sock, session in socks.items() if session.want_write()]
            readable, writable, _ = select.select(list(socks), wlist, [], max(0.0, timeout))
            for sock in writable:
                self._guard(socks[sock], socks[sock].flush)
            pending = [socks[sock] for sock in readable]
        for session in pending:
            self._guard(session, session.read_available)
        for session in sessions:
            self._guard(session, session.misc)

    def _guard(self, session: MqttSession, operation: Any) -> None:
        try:
            operation()
        except MqttConnectionError:
            self._recover(session)

    def _recover(self, session: MqttSession) -> None:
        """Blocking mode: reconnect with backoff (re-subscribes), or raise."""
        logger.warning("MQTT connection %s lost; reconnecting", session.client_id)
        session.ensure_connected()

def _log_only(client_id: str, suspected: int, pause: float) -> None:
    """Default on_takeover: one ERROR at the start of each takeover episode (the pause is the session's)."""
    if pause <= PAUSE_MIN:
        logger.error("MQTT client id %s keeps being taken over right after connecting (%d times): another client "
                     "connects with the same client id; give each client its own id. Pausing %.0fs between "
                     "reconnects meanwhile", client_id, suspected, pause)


class TLSTransport(Transport):
    """kombu transport for `mqtts://host:8883` (TLS always on; client cert via broker_use_ssl)."""

    default_port = 8883
    use_tls = True


__all__ = ["Transport", "TLSTransport", "Channel"]
