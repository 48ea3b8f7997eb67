"""kombu transport for MQTT 5 (paho-mqtt 2.x): `mqtt://host:1883` and `mqtts://host:8883`.

Importing this package registers both schemes in `kombu.transport.TRANSPORT_ALIASES`,
so a stock Celery app works with ``broker_url="mqtts://broker:8883"`` once its
module does ``import kombu_mqtt``. Options: see :mod:`kombu_mqtt.options`.

Behaviour worth knowing:

* Tasks (persistent messages) are published QoS 1 and wait for PUBACK; a PUBACK
  with reason 0x10 ("no matching subscribers") raises :class:`NoSubscribersError`
  for direct/topic exchanges, because the broker dropped the task. Transient
  messages (rpc:// replies, pidbox/remote control, events) and fanout publishes
  never raise: nobody listening is normal for them. ``no_subscribers="ignore"``
  turns the error off. Transient messages are not awaited one by one; a producer
  that sends many (``delivery_mode=1``) learns they all reached the broker with one
  ``connection.transport.confirm_publishes()``, which raises if any was lost or refused.
* A worker's durable queues live in a persistent MQTT session (stable client id,
  option ``client_id``); unacked tasks are redelivered when it comes back, and
  tasks published while it is offline wait for it (until ``session_expiry``).
* Payloads on a queue topic that are not kombu messages (reason
  ``"not_a_kombu_message"``), and messages that reach a persistent session through a
  subscription this worker no longer makes (same ``client_id``, fewer queues; reason
  ``"stale_subscription"``, filed under their topic), are refused: they go to the
  transport option ``dead_letter_handler(queue, topic, payload, reason)`` *before* the
  broker ack, and are not acked while it raises (the transport retries with backoff;
  the broker keeps them meanwhile). Without a handler they are logged, counted per reason
  (``Transport.dead_letter_counts``) and acked. The last ``deadletter_keep`` are kept in
  ``Transport.dead_letters`` as ``(queue, raw payload)``. The worker goes on with the
  next message either way.
* Mosquitto gives shared-subscription messages round robin, whatever a member's
  in-flight window: a busy or offline member's share waits for it. Keep one durable
  client id per worker and delete queues you retire.
* MQTT cannot purge or count a queue on the broker: purge drops only what this
  connection has buffered.
* Acks name packet ids, which the broker hands out per session: after a reconnect on
  which the broker reports no session (restart without persistence, expiry), messages
  received before it are not acked (their ids now name other messages); the broker
  no longer has them either.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

from .errors import (
    MqttConnectionError,
    MqttTransportError,
    NoSubscribersError,
    PublishRejectedError,
    SubscribeRejectedError,
    UnsupportedPatternError,
)

TRANSPORT_ALIASES.setdefault("mqtt", "kombu_mqtt.transport:Transport")
TRANSPORT_ALIASES.setdefault("mqtts", "kombu_mqtt.transport:TLSTransport")

__all__ = [
    "MqttConnectionError",
    "MqttTransportError",
    "NoSubscribersError",
    "PublishRejectedError",
    "SubscribeRejectedError",
    "UnsupportedPatternError",
]
