"""Where signing hooks into Celery's worker and producer: strategy, Request, Consumer, AMQP.

Why each hook:
- `signed_strategy` (installed on every task): admission before Celery builds a
  Request, so nothing unverified reaches the task machinery, and the Request runs on
  exactly the body that was verified (crypto once per message);
- `SignedRequest`: re-checks the signer right before execution (a task waiting for its
  eta does not outlive a revocation), and a header never turns results on;
- `SignedConsumer`: refusals stock Celery only logs (unknown task names, messages that
  are not tasks, undecodable messages) are quarantined, counted and acked;
- `delay_limited_amqp`: refuses at send time an eta the receivers would refuse.
Every hook finds its app's state through security.app_signing (nothing global here).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.worker.consumer.consumer import Consumer
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy

from . import contract
from .admission import Delivery, check_send_delay, replay_key
from .app_signing import admit, get_verifier, signing_context
from .policy import BUILTIN_PREFIX
from .signing import SignatureRefused, SignerInfo, SigningError

log = logging.getLogger("edgeledger.security")


def _consumed(consumer: Any) -> frozenset[str]:
    task_consumer = getattr(consumer, "task_consumer", None)
    names: set[str] = set()
    for queue in getattr(task_consumer, "queues", None) or ():
        names.update(n for n in (queue.name, queue.routing_key) if n)
    return frozenset(names)


def signed_strategy(task: Task, app: Celery, consumer: Any, **kwargs: Any):
    """Consumer strategy: verify + bind + policy + replay-check before Celery builds a
    Request, which then runs on the verified body (SignedRequest)."""
    if signing_context(app) is None:
        raise SigningError(f"task {task.name} uses signed_strategy but setup_signing was not called for its app")
    if not (isinstance(task.Request, type) and issubclass(task.Request, SignedRequest)):
        task.Request = SignedRequest
    # what runs an admitted message: Celery's default, or the task's own (a batching consumer)
    inner = (getattr(task, "admitted_strategy", None) or default_strategy)(task, app, consumer, **kwargs)
    connection_errors = consumer.connection_errors

    def handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        info = message.delivery_info or {}
        delivery = Delivery(routing_key=info.get("routing_key"), queues=_consumed(consumer))
        vm = admit(app, dict(message.headers or {}), message.body, message.content_type, delivery)
        if vm is None:
            # Kept in quarantine; acking stops the broker from redelivering it forever.
            ack(log, connection_errors)
            return None
        message._decoded_cache = vm.body()  # the Request runs on exactly what was verified
        return inner(message, body, ack, reject, callbacks, **kw)

    return handler


def patch_tasks(app: Celery) -> None:
    """Install the signed strategy on every task of `app`."""
    for task in app.tasks.values():
        task.Strategy = signed_strategy


class SignedRequest(Request):
    """A Request of a message `admit` let through.

    - runs on the body admit verified (no second decode through the process-wide
      serializer registry, whose settings may be another app's);
    - a task declared ignore_result stays so whatever the message headers say (an
      `ignore_result: false` header plus `reply_to` would make the worker publish a
      result where the sender chose);
    - `revoked()`, which Celery calls right before execution (also for eta and
      rate-limited tasks leaving the timer), re-checks the signer against the current
      CRL: nothing from a signer revoked meanwhile runs.
    """

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        payload = self._payload
        embed = payload[2] if isinstance(payload, (list, tuple)) and len(payload) == 3 else {}
        self._edge_signer: SignerInfo | None = embed.get("signer") if isinstance(embed, dict) else None
        self._body = tuple(payload)
        self._decoded = True
        self._content_type = self._content_encoding = None
        if self._task.ignore_result:
            self._ignore_result = True
            self._request_dict["ignore_result"] = True

    @property
    def signer(self) -> SignerInfo | None:
        """Who signed this message, as admission verified it (the task sees it as request.signer)."""
        return self._edge_signer

    def revoked(self) -> bool:
        if super().revoked():
            return True
        ctx = signing_context(self._app)
        refusal = (ctx.verifier.recheck_signer(self._edge_signer) if ctx is not None
                   else SignatureRefused("check_error", "signing context of this app is gone"))
        if refusal is None:
            return False
        signer = self._edge_signer
        verifier = ctx.verifier if ctx is not None else get_verifier()
        refusal = SignatureRefused(refusal.reason, f"{refusal.detail} (re-checked right before execution)")
        verifier.record(refusal, signer.envelope if signer else None, headers={"id": self.id, "task": self.name},
                        signer=signer.agent_id if signer else None)
        self._announce_revoked(refusal.reason, False, None, False)  # acks, never runs
        return True


class SignedConsumer(Consumer):
    """Consumer that keeps what stock Celery only logs: unknown task names, messages
    without a task header, invalid tasks and undecodable messages are quarantined,
    counted and acked. Unknown tasks get no failure result (stock Celery publishes one
    to the message's own reply_to)."""

    def update_strategies(self) -> None:
        patch_tasks(self.app)
        super().update_strategies()

    def _refuse(self, reason: str, detail: str, message: Any) -> None:
        try:
            headers = dict(message.headers or {})
        except (TypeError, ValueError):
            headers = {}
        get_verifier(self.app).record(SignatureRefused(reason, detail), message.body, headers=headers)
        message.ack_log_error(log, self.connection_errors)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse("not_a_task", "message has no task header and is not a task", message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = message.headers.get("task") if isinstance(message.headers, dict) else None
        if isinstance(name, str) and (name.startswith(BUILTIN_PREFIX) or contract.is_fleet_task(name)):
            # a fleet task of another role (e.g. an agent command sent to the ingest queue)
            self._refuse("task_not_allowed", f"{name!r} is not a task this worker runs for any signer", message)
        else:
            self._refuse("unknown_task", f"task {name!r} is not registered on this worker", message)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._refuse("malformed", f"invalid task message: {exc}", message)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        cause = exc.args[0] if exc.args else None
        if isinstance(exc, SignatureRefused) or isinstance(cause, SignatureRefused) or isinstance(
                exc.__cause__, SignatureRefused):
            message.ack_log_error(log, self.connection_errors)  # recorded by the decoder already
            return
        self._refuse("not_a_task", f"message without a task header could not be decoded: {exc}", message)


#: worker_consumer value setup_signing installs
CONSUMER_PATH = f"{__name__}:SignedConsumer"


def delay_limited_amqp(base: type) -> type:
    """The app's AMQP class, refusing at send time an eta the receivers would refuse."""

    class SignedAMQP(base):
        def as_task_v2(self, task_id: str, name: str, *args: Any, **kwargs: Any) -> Any:
            message = super().as_task_v2(task_id, name, *args, **kwargs)
            ctx = signing_context(self.app)
            if ctx is not None:
                check_send_delay(name, message.headers.get("eta"), ctx.config.max_delay_seconds)
            return message

    SignedAMQP.__qualname__ = f"SignedAMQP[{base.__name__}]"
    return SignedAMQP


def on_task_postrun(sender: Task | None = None, task_id: str | None = None, **_: Any) -> None:
    """`task_postrun` receiver: a task that ran is marked done in its app's replay guard."""
    if sender is None or task_id is None:
        return
    ctx = signing_context(sender.app)
    signer = getattr(sender.request, "signer", None)
    if ctx is None or signer is None:
        return
    try:
        ctx.guard.mark_done(replay_key(signer.agent_id, task_id, sender.request.retries))
    except Exception:
        log.exception("could not mark task %s done in the replay guard", task_id)
