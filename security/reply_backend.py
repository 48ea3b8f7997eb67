"""rpc:// results through a named direct exchange (`c.rep`) instead of the default one.

Why: Celery's rpc backend publishes results to the default exchange with the caller's
reply queue as routing key, i.e. topic `<prefix>/d/amq.default/<reply-id>` over MQTT.
An ACL cannot let agents write there without also letting them write into every
queue (`amq.default/agent.<other>`). Publishing results to the direct exchange
`c.rep` (topic `<prefix>/d/c.rep/<reply-id>`) gives replies their own subtree that
the broker ACL opens for writing and nothing else. The caller's reply queue is bound
to both exchanges, so it still receives results from stock rpc:// workers.
"""

from __future__ import annotations

from celery.backends.rpc import RPCBackend

DEFAULT_REPLY_EXCHANGE = "c.rep"
BACKEND_PATH = "security.reply_backend:ReplyExchangeRPCBackend"


class ReplyExchangeRPCBackend(RPCBackend):
    """RPCBackend whose results travel on a named direct exchange."""

    reply_exchange = DEFAULT_REPLY_EXCHANGE

    def _create_exchange(self, name, type="direct", delivery_mode=2):  # noqa: A002 - celery's signature
        from .celery_signing import _apps

        ctx = _apps.get(self.app)
        exchange = (ctx.config.rpc_reply_exchange if ctx else None) or self.reply_exchange
        return self.Exchange(exchange, type="direct", durable=False, auto_delete=True, delivery_mode=delivery_mode)
