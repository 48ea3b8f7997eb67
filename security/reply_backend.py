"""rpc:// results through a named direct exchange (`c.rep`), accepted only when bound.

Why the exchange: Celery's rpc backend publishes results to the default exchange with
the caller's reply queue as routing key, i.e. topic `<prefix>/d/amq.default/<reply-id>`
over MQTT. An ACL cannot let agents write there without also letting them write into
every queue (`amq.default/agent.<other>`). Publishing results to the direct exchange
`c.rep` (topic `<prefix>/d/c.rep/<reply-id>`) gives replies their own subtree that
the broker ACL opens for writing and nothing else. The caller's reply queue is bound
to both exchanges, so it still receives results from stock rpc:// workers.

Why the guard: every fleet certificate may write that subtree, so a verified signature
alone does not make a result the commanded agent's answer. Each result is checked by
`ResultGuard` (security/result_guard.py) before Celery hands it to a waiting
`AsyncResult`, on both paths results arrive by (the consumer callback and polling).
"""

from __future__ import annotations

from typing import Any

from celery.backends.rpc import ResultConsumer, RPCBackend

from .app_signing import get_verifier, signing_context
from .result_guard import ResultGuard

DEFAULT_REPLY_EXCHANGE = "c.rep"
BACKEND_PATH = "security.reply_backend:ReplyExchangeRPCBackend"
_VERDICT = "_edge_result_verdict"  # set on a kombu Message once checked (a message is checked once)


class GuardedResultConsumer(ResultConsumer):
    """Drops results the backend's guard refuses before they can fulfil a waiter."""

    def on_state_change(self, meta: Any, message: Any) -> None:
        if self.backend.admit_result(meta, message):
            super().on_state_change(meta, message)


class ReplyExchangeRPCBackend(RPCBackend):
    """RPCBackend whose results travel on a named direct exchange and must be bound."""

    reply_exchange = DEFAULT_REPLY_EXCHANGE
    ResultConsumer = GuardedResultConsumer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.result_guard = ResultGuard()
        super().__init__(*args, **kwargs)

    def _create_exchange(self, name, type="direct", delivery_mode=2):
        ctx = signing_context(self.app)
        exchange = (ctx.config.rpc_reply_exchange if ctx else None) or self.reply_exchange
        return self.Exchange(exchange, type="direct", durable=False, auto_delete=True, delivery_mode=delivery_mode)

    # -- binding ---------------------------------------------------------------------
    def expect(self, task_id: str, signer: str) -> None:
        """Accept the result of `task_id` only when signed by certificate CN `signer`.

        Call before publishing the task (a fast agent could answer first otherwise).
        """
        self.result_guard.expect(task_id, signer)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        self.result_guard.sent(task_id)
        super().on_task_call(producer, task_id)

    def admit_result(self, meta: Any, message: Any) -> bool:
        """Check one received result message (memoised on the message)."""
        verdict = getattr(message, _VERDICT, None)
        if verdict is None:
            verifier = get_verifier(self.app)
            props = getattr(message, "properties", None) or {}
            verdict = self.result_guard.admit(
                meta, message.body, props.get("correlation_id"),
                verify=verifier.verify, record=verifier.record,
            )
            setattr(message, _VERDICT, verdict)
        return verdict

    def _slurp_from_queue(self, task_id, accept, limit=1000, no_ack=False):  # celery's signature
        """Polling path (`AsyncResult.state` before the result arrived): same check."""
        for message in super()._slurp_from_queue(task_id, accept, limit, no_ack):
            if self.admit_result(message.payload, message):
                yield message
            elif not no_ack:
                message.ack()  # kept in quarantine; must not circulate
