"""Exceptions of the MQTT transport: one-line messages that say cause and fix."""

from __future__ import annotations

from kombu.exceptions import KombuError


class MqttTransportError(KombuError):
    """Base class for errors raised by kombu_mqtt."""


class MqttConnectionError(MqttTransportError, ConnectionError):
    """The broker is unreachable or closed the connection (kombu retries these)."""


class PublishNotSentError(MqttConnectionError):
    """The connection was found dead while writing a publish: nothing reached the broker."""


class NoSubscribersError(MqttTransportError):
    """The broker answered PUBACK 0x10: nobody is subscribed, the message is gone."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        super().__init__(
            f"no consumer is subscribed to MQTT topic {topic!r}, so the broker dropped the message:"
            " start a worker for that queue first (its persistent session keeps the queue while it is offline)"
        )


class PublishRejectedError(MqttTransportError):
    """The broker refused a publish (PUBACK reason >= 0x80, e.g. not authorized)."""


class SubscribeRejectedError(MqttTransportError):
    """The broker refused a subscription (SUBACK reason >= 0x80, e.g. ACL)."""


class UnsupportedPatternError(MqttTransportError, ValueError):
    """An AMQP binding pattern that MQTT filters cannot express."""
