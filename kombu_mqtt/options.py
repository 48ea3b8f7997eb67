"""Typed transport options (Celery `broker_transport_options`).

Every option the transport reads is declared here with its default, so the
set of knobs is visible in one place:

``client_id`` (str, default ``<prefix>-<hostname>-<hash of consumed durable queue names>``)
    MQTT client id of the one connection that consumes durable queues (the
    worker's task connection). It gets a persistent session (``clean_start=False``)
    so unacked tasks are redelivered after a crash. Set it when several workers
    on one host consume the same queues. All other connections use random ids.
``topic_prefix`` (str, default ``"kombu"``)
    First topic level of every topic (``P`` in docs/INTERFACES.md).
``session_expiry`` (int seconds, default 7 days)
    How long the broker keeps the durable session (and its queued tasks) while
    the worker is offline.
``keepalive`` (int seconds, default 60)
    MQTT keepalive; the idle worker wakes about every keepalive/3 to ping.
``max_inflight`` (int, default 100)
    Fire-and-forget QoS 1 publishes (results, events) a connection may have without
    PUBACK; at half of it the publisher reads the PUBACKs, at the limit it waits.
``receive_maximum`` (int, default: the consumer's prefetch count)
    MQTT 5 Receive Maximum of the durable session; a local gate enforces prefetch exactly anyway.
``connect_timeout`` (float seconds, default 10)
    TCP + TLS + CONNACK budget for one attempt.
``publish_timeout`` (float seconds, default 30)
    How long a persistent publish waits for its PUBACK.
``reconnect_timeout`` (float seconds, default 30)
    Total time a connection retries (jittered exponential backoff) before raising.
``reconnect_min_delay`` / ``reconnect_max_delay`` (float seconds, default 0.1 / 10)
    Backoff bounds.
``no_subscribers`` (``"raise"`` | ``"ignore"``, default ``"raise"``)
    What a persistent message (delivery_mode 2, e.g. a Celery task) published to a
    direct/topic exchange does when the broker answers PUBACK 0x10. Transient
    messages (rpc replies, pidbox, events) and fanout publishes never raise.
``dead_letter_handler`` (callable or ``"package.module:function"`` string, default none)
    Called as ``handler(queue, topic, payload_bytes, reason)`` for every message the
    transport refuses to deliver, *before* it acks that message on the broker.
    ``reason`` is ``"not_a_kombu_message"`` (a payload on a queue topic that is not a
    kombu message) or ``"stale_subscription"`` (a message for a subscription this
    process no longer makes; ``queue`` is then the topic). If the handler raises, the
    message is NOT acked: it stays with the broker, and the transport calls the handler
    again after ``dead_letter_retry`` seconds, doubling up to ``dead_letter_retry_max``,
    until it returns (then acks). Meanwhile the message holds one of the session's
    in-flight slots: at prefetch 1 (Receive Maximum 1) the queue waits for it. In an
    event loop the retry runs on the keepalive tick (every keepalive/3 s) at the
    earliest. A handler may see one message more than once; it should be idempotent.
    Without a handler the transport logs a warning, counts the refusal per reason
    (``Transport.dead_letter_counts``) and acks: the message is gone.
``on_takeover`` (callable, default none)
    The durable session's fixed client id is being taken over: its connections keep
    closing right after CONNACK (another client uses the same id; kombu_mqtt.takeover).
    Called with ``(client_id, suspected_losses, pause_seconds)``; the session logs one
    ERROR and pauses (growing up to 60 s) before each reconnect while the pattern holds.
``dead_letter_retry`` / ``dead_letter_retry_max`` (float seconds, default 1 / 60)
    Backoff between calls of a failing ``dead_letter_handler`` for one message.
``deadletter_keep`` (int, default 100)
    How many refused payloads the transport keeps in memory for inspection
    (``Transport.dead_letters``, ``(queue, payload)`` tuples, newest last).
``identity`` (str, default ``""``)
    A label for the TLS client identity (e.g. the certificate path). The transport
    does not read it: kombu keys its process-wide connection and producer pools by
    URL and transport options but not by ``broker_use_ssl``, so two Celery apps in one
    process with different client certificates on the same URL would share pooled
    connections (and publish as each other). Give each identity its own label.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal


@dataclass(frozen=True)
class TransportOptions:
    """Parsed `transport_options`; unknown keys are ignored (kombu passes its own)."""

    client_id: str | None = None
    topic_prefix: str = "kombu"
    session_expiry: int = 7 * 24 * 3600
    keepalive: int = 60
    max_inflight: int = 100
    receive_maximum: int | None = None
    connect_timeout: float = 10.0
    publish_timeout: float = 30.0
    reconnect_timeout: float = 30.0
    reconnect_min_delay: float = 0.1
    reconnect_max_delay: float = 10.0
    no_subscribers: Literal["raise", "ignore"] = "raise"
    deadletter_keep: int = 100
    identity: str = ""
    dead_letter_handler: Any = None  # callable | "module:function" | None (resolved by the transport)
    dead_letter_retry: float = 1.0
    dead_letter_retry_max: float = 60.0
    on_takeover: Any = None  # callable(client_id, suspected, pause) | None: the durable session was taken over

    @classmethod
    def from_mapping(cls, raw: dict[str, Any] | None) -> TransportOptions:
        """Coerce known keys to their declared types; raise ValueError on nonsense."""
        raw = raw or {}
        values: dict[str, Any] = {}
        for spec in fields(cls):
            if spec.name not in raw or raw[spec.name] is None:
                continue
            value = raw[spec.name]
            if spec.name == "on_takeover":
                if not callable(value):
                    raise ValueError("broker_transport_options['on_takeover'] must be a callable")
                values[spec.name] = value
                continue
            if spec.name == "dead_letter_handler":
                if not (callable(value) or isinstance(value, str)):
                    raise ValueError(
                        "broker_transport_options['dead_letter_handler'] must be a callable or a 'module:function' string"
                    )
                values[spec.name] = value
                continue
            default = spec.default
            try:
                if isinstance(default, bool):
                    value = bool(value)
                elif isinstance(default, int) or spec.name == "receive_maximum":
                    value = int(value)
                elif isinstance(default, float):
                    value = float(value)
                else:
                    value = str(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"broker_transport_options[{spec.name!r}]={value!r} is not a valid {spec.type}") from exc
            values[spec.name] = value
        if values.get("no_subscribers", "raise") not in ("raise", "ignore"):
            raise ValueError("broker_transport_options['no_subscribers'] must be 'raise' or 'ignore'")
        prefix = values.get("topic_prefix", "kombu")
        if not prefix or set(prefix) & set("/+#") or prefix.startswith("$"):
            raise ValueError("broker_transport_options['topic_prefix'] must be one non-empty topic level (no / + # or leading $)")
        return cls(**values)
