"""Payloads the MQTT transport refuses to deliver, kept like every other refusal.

Why: kombu_mqtt knows nothing of signing; it hands what it cannot deliver (not kombu
messages, messages of a stale subscription) to a `dead_letter_handler`. This one puts
them into the app's quarantine and refusal counter.
"""

from __future__ import annotations

from .signing import SignatureRefused
from .verifier import Verifier


class DeadLetterRecorder:
    """The MQTT transport's `dead_letter_handler` (kombu_mqtt): payloads it refuses to
    deliver are kept in this app's quarantine and counted; not kombu messages as
    `not_a_task`, the others under the transport's reason. Never raises, so the
    transport acks them."""

    NOT_KOMBU = "not_a_kombu_message"  # kombu_mqtt.deadletter.NOT_KOMBU_MESSAGE

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    def __json__(self) -> str:
        """How `celery inspect stats` shows it (the worker reports its transport options)."""
        return f"{__name__}.DeadLetterRecorder"

    def __call__(self, queue: str, topic: str, payload: bytes, reason: str) -> None:
        label = "not_a_task" if reason == self.NOT_KOMBU else str(reason)
        detail = f"the transport refused a message on {topic!r} for queue {queue!r}: {reason}"
        self.verifier.record(SignatureRefused(label, detail), bytes(payload), headers={})
