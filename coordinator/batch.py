"""Batched ingestion with group commit: many admitted tasks, one journal transaction, acks after it.

Why: the journal commits with synchronous=FULL, so one transaction per reading made the
fsync the ceiling (~200 readings/s). Here the worker buffers the requests admission let
through and hands up to `size` of them to `Ingestor.run_batch`, which journals them in ONE
transaction (duplicate task ids and duplicate seqs are checked inside it); each message is
acked only after that commit. A crash before the commit leaves every message of the batch
unacked, so the broker redelivers them and the journal's unique task id keeps them once.
A journal write failure puts the whole batch back unacked (`JournalOutage`).

Why our own consumer, not celery-batches (0.11, the maintained `Batches` task class, read
for issue #13): it does not compose with what we must keep.
- It requires celery < 5.7; we run Celery 5.7.
- Its `flush` acks every acks_late request in the pool callback whether the batch
  succeeded or raised (`apply_batches_task` swallows the exception and returns None), so a
  failed journal write would ack, i.e. lose, the whole batch.
- Its Strategy replaces the task's strategy, so either it or `security.celery_worker.
  signed_strategy` (admission: signature, policy, replay guard, quarantine) runs, not both;
  and the task receives `SimpleRequest` copies without the verified signer, without
  `SignedRequest.revoked()` (the CRL re-check right before execution) and without a way
  to ack or reject one message of the batch (a refused or duplicate task must not hold up
  the others).
- Its postrun signal carries one fresh batch id, so the replay guard's per-task
  `mark_done` never runs.
- Its flush timer is the consumer's timer; ours is too (the kombu_mqtt event loop runs
  it in the worker thread), which is the one part we keep alike.

Here admission stays exactly as it is: `signed_strategy` admits (or quarantines, counts
and acks) every message, then hands the SignedRequest to `BatchConsumer.strategy`
(the task's `admitted_strategy`), which is Celery's default strategy with its last step,
"run the request now", replaced by "buffer it".

Replay guard: the per-message `accept` stays in admission, before any Request exists: the
refusal must be decided and quarantined per message, in the signing layer that agents share,
and it is a separate SQLite file (WAL, synchronous=NORMAL: no fsync per write), so it
cannot join the journal's transaction. What can be batched is: `mark_done` for the whole
batch is one transaction (`ReplayGuard.mark_done_many`) after the journal commit, before
the acks, as `task_postrun` did per task.
"""

from __future__ import annotations

import inspect
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery._state import _task_stack
from celery.worker.state import task_ready
from celery.worker.strategy import default as default_strategy

from .errors import CoordinatorError
from .ingest import Ingestor, TaskContext

log = logging.getLogger("edgeledger.coordinator.ingest")


class _Buffering:
    """The consumer as Celery's default strategy sees it, except that a request ready to
    run goes to the batch (`on_task_request`) instead of the pool."""

    def __init__(self, consumer: Any, on_task_request: Callable[[Any], None]) -> None:
        self._consumer = consumer
        self.on_task_request = on_task_request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class BatchConsumer:
    """Buffers admitted requests of the coordinator's tasks and runs them in batches.

    `context(request, name)` builds the TaskContext; `outage` is the
    JournalOutage (counts, logs once, pauses, releases replay entries, requeues).
    """

    def __init__(self, app: Celery, ingestor: Ingestor, outage: Any,
                 context: Callable[[Any, str], TaskContext], size: int, wait: float) -> None:
        self.app = app
        self.ingestor = ingestor
        self.outage = outage
        self.context = context
        self.size = max(1, int(size))
        self.wait = max(0.0, float(wait))
        self.pending: list[Any] = []
        self._timer: Any = None
        self._entry: Any = None
        self._busy = False  # the last batch was large: gather the next one for `wait`

    # -- Celery side ------------------------------------------------------------------
    def strategy(self, task: Any, app: Celery, consumer: Any, **kwargs: Any) -> Any:
        """`admitted_strategy` of each task: Celery's default strategy, buffering.

        Celery builds strategies again whenever the consumer (re)connects: what is still
        buffered then came over the lost connection. It cannot be acked any more and the
        broker redelivers it to the resumed session, so it is dropped here, unjournaled,
        with its replay-guard entry released so the redelivered copy passes admission.
        """
        self.connected(consumer.timer)
        return default_strategy(task, app, _Buffering(consumer, self.add), **kwargs)

    def connected(self, timer: Any) -> None:
        """A (new) broker connection, with its timer: what is buffered came over the old one."""
        self._timer = timer
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None
        stale, self.pending = self.pending, []
        if stale:
            log.warning("dropped %d buffered tasks of a lost broker connection: the broker redelivers them",
                        len(stale))
            self._release(stale)
            for request in stale:
                task_ready(request)

    def add(self, request: Any) -> None:
        """A request ready to run: into the batch; flush when full, else after `wait`.

        While the previous batch was small (under a tenth of `size`) the worker keeps up:
        then the batch commits as soon as the messages at hand are handed out (the next
        event-loop turn), so a quiet fleet's readings wait for nobody; under load, when
        batches come out large, they gather for `wait` to grow larger still.
        """
        self.pending.append(request)
        if len(self.pending) >= self.size or self._timer is None:
            self.flush()
        elif self._entry is None:
            self._entry = self._timer.call_after(self.wait if self._busy else 0.0, self.flush)

    def flush(self) -> None:
        """Run what is buffered: one transaction, then ack (or requeue all on a journal failure)."""
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None
        requests, self.pending = self.pending, []
        self._busy = len(requests) >= max(2, self.size // 10)
        if requests:
            self.run(requests)

    # -- one batch --------------------------------------------------------------------
    def run(self, requests: list[Any]) -> None:
        pid, accepted = os.getpid(), time.monotonic()
        runnable: list[tuple[Any, TaskContext, Any]] = []
        for request in requests:
            if request.revoked():  # revoked, or its signer meanwhile: recorded and acked there
                continue
            request.on_accepted(pid, accepted)  # Celery's bookkeeping; acks_late: no ack here
            try:
                payload = _payload(request)
                ctx = self.context(request, request.name)
            except (TypeError, CoordinatorError) as exc:
                self._failed(request, exc)
                continue
            runnable.append((request, ctx, payload))
        if not runnable:
            return
        started = time.monotonic()
        try:
            by_id = {ctx.task_id: request for request, ctx, _ in runnable}
            outcomes = self.ingestor.run_batch([(ctx, payload) for _, ctx, payload in runnable],
                                               around=lambda ctx: _current(by_id[ctx.task_id]))
        except sqlite3.Error as exc:  # journal unwritable: the whole batch goes back, never acked
            self.outage.failed_batch(self.app, [(r, ctx.signer) for r, ctx, _ in runnable], exc)
            for request, _, _ in runnable:
                task_ready(request)
            return
        self.outage.ok()
        self._mark_done([(r, ctx) for (r, ctx, _), out in zip(runnable, outcomes, strict=True)
                         if not isinstance(out, Exception)])
        runtime = time.monotonic() - started
        log.debug("batch of %d tasks journaled in one transaction in %.1f ms", len(runnable), runtime * 1000)
        for (request, _, _), outcome in zip(runnable, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._failed(request, outcome)
                continue
            task_ready(request, successful=True)
            request.acknowledge()  # on a closed channel a no-op (kombu_mqtt): the broker redelivers, the journal dedupes
            request.send_event("task-succeeded", result=repr(outcome), runtime=runtime)

    def _failed(self, request: Any, exc: BaseException) -> None:
        """A task that cannot run (wrong arguments, a bug in its writes): dropped, as a
        failing acks_late task is with task_acks_on_failure_or_timeout off (never acked as done)."""
        log.error("task %s[%s] failed: %r", request.name, request.id, exc, exc_info=exc)
        task_ready(request)
        request.reject(requeue=False)
        request.send_event("task-failed", exception=repr(exc))

    def _release(self, requests: list[Any]) -> None:
        """Forget the replay-guard entries of requests that were never run (their redelivery must pass)."""
        from security.admission import replay_key
        from security.app_signing import signing_context

        ctx = signing_context(self.app)
        if ctx is None:
            return
        for request in requests:
            signer = getattr(request, "signer", None)
            if signer is not None:
                ctx.guard.release(replay_key(signer.agent_id, request.id, request.request_dict.get("retries")),
                                  signer.envelope_digest)

    def _mark_done(self, done: list[tuple[Any, TaskContext]]) -> None:
        from security.admission import replay_key
        from security.app_signing import signing_context

        ctx = signing_context(self.app)
        if ctx is None or not done:
            return
        keys = [replay_key(c.signer.agent_id, r.id, r.request_dict.get("retries")) for r, c in done]
        try:
            ctx.guard.mark_done_many(keys)
        except sqlite3.Error:  # as task_postrun did: the journal already dedupes a redelivery
            log.exception("could not mark %d tasks done in the replay guard", len(keys))


def _payload(request: Any) -> Any:
    """The one argument of the task (`reading`, `result`, ...), positional or by name."""
    bound = inspect.signature(request.task.run).bind(*request.args, **request.kwargs)
    values = list(bound.arguments.values())
    return values[0] if values else None


@contextmanager
def _current(request: Any) -> Iterator[None]:
    """Make `request` Celery's current task, as the tracer does for one task: what a task
    records (security.app_signing.ensure_bound quarantines a refusal) finds its id and app."""
    task = request.task
    _task_stack.push(task)
    task.push_request(id=request.id, task=request.name, retries=request.request_dict.get("retries", 0),
                      signer=request.signer, delivery_info=request.delivery_info)
    try:
        yield
    finally:
        task.pop_request()
        _task_stack.pop()
