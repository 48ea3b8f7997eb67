"""Messages the transport refuses to hand to a consumer, and who gets to keep them.

Why a module of its own: a refusal must not vanish. MQTT has no dead-letter
exchange, so the transport gives every refused message to an application
callback *before* it acks it on the broker (transport option
``dead_letter_handler``); if that callback fails, the message is not acked and
stays with the broker. Without a callback the default is to log a warning and
count the refusal by reason (``Transport.dead_letter_counts``), keeping the last
few in memory (``Transport.dead_letters``) for inspection.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable

from kombu.utils.imports import symbol_by_name

logger = logging.getLogger(__name__)

#: A payload on a queue topic that is not a kombu message envelope (JSON object with
#: ``properties`` and ``body``).
NOT_KOMBU_MESSAGE = "not_a_kombu_message"
#: A message that reached a persistent session through a subscription this process
#: does not make (same client id, fewer queues). Its queue is unknown: it is filed
#: under its topic.
STALE_SUBSCRIPTION = "stale_subscription"

REASONS = (NOT_KOMBU_MESSAGE, STALE_SUBSCRIPTION)

#: ``handler(queue, topic, payload, reason)``; returning normally lets the transport ack.
DeadLetterHandler = Callable[[str, str, bytes, str], object]
HandlerSpec = DeadLetterHandler | str | None


def resolve_handler(spec: HandlerSpec) -> DeadLetterHandler | None:
    """A callable, or an importable ``"package.module:function"`` string, or None."""
    if spec is None or spec == "":
        return None
    if callable(spec):
        return spec
    if isinstance(spec, str):
        try:
            handler = symbol_by_name(spec)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(
                f"broker_transport_options['dead_letter_handler']={spec!r} cannot be imported ({exc}):"
                " give a callable or a 'package.module:function' string"
            ) from exc
        if not callable(handler):
            raise ValueError(f"broker_transport_options['dead_letter_handler']={spec!r} is not callable")
        return handler
    raise ValueError(
        f"broker_transport_options['dead_letter_handler'] must be a callable or a 'module:function' string, not {type(spec).__name__}"
    )


class DeadLetterBox:
    """Hands refused messages to the application handler, or logs and counts them."""

    def __init__(self, handler: DeadLetterHandler | None, keep: int) -> None:
        self.handler = handler
        #: the last `keep` refused messages as (queue, payload); newest last
        self.kept: deque[tuple[str, bytes]] = deque(maxlen=max(0, keep))
        #: refusals per reason, whether or not a handler took them
        self.counts: Counter[str] = Counter()
        #: handler failures (those messages were left unacked on the broker)
        self.failures = 0

    def refuse(self, queue: str, topic: str, payload: bytes, reason: str, detail: str, first: bool = True) -> bool:
        """Record one refusal (`first`: not a retry); True when the caller may ack it on the broker.

        The handler runs before the ack. If it raises, the message is not acked: the
        broker keeps it, and the transport calls the handler again later.
        """
        data = bytes(payload)
        if first:
            self.counts[reason] += 1
            self.kept.append((queue, data))
        if self.handler is None:
            logger.warning(
                "MQTT transport refused a message on %r for queue %r (%s: %s); acked and dropped (%d bytes)."
                " Set broker_transport_options['dead_letter_handler'] to keep such messages.",
                topic, queue, reason, detail, len(data),
            )
            return True
        try:
            self.handler(queue, topic, data, reason)
        except Exception:  # the handler is application code: any failure means "not kept"
            self.failures += 1
            logger.exception(
                "dead_letter_handler failed for a message on %r for queue %r (%s): not acked (the broker keeps it),"
                " the transport retries later; fix the handler or what it writes to",
                topic, queue, reason,
            )
            return False
        logger.info("MQTT transport refused a message on %r for queue %r (%s: %s); handed to dead_letter_handler", topic, queue, reason, detail)
        return True
