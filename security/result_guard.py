"""Which rpc:// results a caller accepts: from the commanded agent, for its task, once.

Why: every fleet certificate may write to the reply topics (`<prefix>/d/c.rep/+`), and
a result's signature only proves it came from *some* fleet member. Without this check
any agent could answer a command sent to another agent (or replay an old answer), and
the operator would read the forgery as the commanded device's result.

The caller says, per task id it sends, which certificate CN must sign the result
(`expect`); a task sent without that binding accepts any verified fleet signer (the
stock behaviour, kept for callers that do not command agents). Refused results are
logged, counted and quarantined with reason `result_unbound` or `result_replay`, and
never reach the waiting `AsyncResult`: it keeps waiting for the genuine answer.

Memory only, per process: the bookkeeping lives as long as the caller waits for its
results (`edge-coordinator send` is one short-lived process per command).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from celery import states

from .signing import SignatureRefused

log = logging.getLogger("edgeledger.security")

ANY_SIGNER = ""  # a task sent without a binding: any verified fleet certificate may answer
MAX_TRACKED = 65536  # task ids / envelope digests remembered (oldest forgotten first)

VerifyFn = Callable[[bytes | str], Any]  # -> security.codec.VerifiedMessage
RecordFn = Callable[..., None]  # security.verifier.Verifier.record


def _remember(store: OrderedDict[str, Any], key: str, value: Any) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > MAX_TRACKED:
        store.popitem(last=False)


class ResultGuard:
    """Per-caller bookkeeping of sent task ids, their expected signer, and answered ids."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, str] = OrderedDict()  # task id -> expected CN (or ANY_SIGNER)
        self._answered: OrderedDict[str, str] = OrderedDict()  # task id -> CN whose final result was taken

    def expect(self, task_id: str, signer: str) -> None:
        """Only `signer` (certificate CN) may answer `task_id`. Call before publishing."""
        if not signer:
            raise ValueError("expect() needs the CN of the certificate that must sign the result")
        with self._lock:
            _remember(self._pending, task_id, signer)

    def sent(self, task_id: str) -> None:
        """`task_id` was published by this caller (keeps a binding set by `expect`)."""
        with self._lock:
            if task_id not in self._pending and task_id not in self._answered:
                _remember(self._pending, task_id, ANY_SIGNER)

    def check(self, meta: Any, signer: str, correlation_id: str | None = None) -> None:
        """Raise SignatureRefused unless this verified result may answer its task; then
        remember it. A final state (SUCCESS, FAILURE, ...) closes the task id: any later
        result for it, the same envelope again included, is a replay. Intermediate states
        (STARTED, RETRY) may repeat: they never fulfil a waiter."""
        if not isinstance(meta, dict) or not isinstance(meta.get("task_id"), str):
            raise SignatureRefused("result_unbound", "result carries no task id")
        task_id = meta["task_id"]
        if correlation_id is not None and correlation_id != task_id:
            raise SignatureRefused(
                "result_unbound", f"result for task {task_id} arrived with correlation id {correlation_id}"
            )
        with self._lock:
            if task_id in self._answered:
                raise SignatureRefused(
                    "result_replay", f"task {task_id} already has its result (signed by {self._answered[task_id]!r})"
                )
            expected = self._pending.get(task_id)
            if expected is None:
                raise SignatureRefused("result_unbound", f"result for task {task_id}, which this caller did not send")
            if expected != ANY_SIGNER and signer != expected:
                raise SignatureRefused(
                    "result_unbound", f"result for task {task_id} signed by {signer!r}; only {expected!r} was commanded"
                )
            if meta.get("status") in states.READY_STATES:
                self._pending.pop(task_id, None)
                _remember(self._answered, task_id, signer)

    def admit(self, meta: Any, raw: bytes | str, correlation_id: str | None, verify: VerifyFn,
              record: RecordFn) -> bool:
        """True when the result may reach its waiter; False (recorded once) otherwise.

        `raw` is the signed envelope exactly as received; `verify` returns its (cached)
        VerifiedMessage. Fails closed: any error in the check refuses the result.
        """
        signer: str | None = None
        task_id = meta.get("task_id") if isinstance(meta, dict) else None
        try:
            vm = verify(raw)
            signer = vm.signer.agent_id
            if vm.kind != "data":
                raise SignatureRefused("result_unbound", f"a {vm.kind!r} message is not a result")
            self.check(meta, signer, correlation_id)
            return True
        except SignatureRefused as exc:
            record(exc, raw, headers={"id": task_id, "task": None}, signer=signer)
        except Exception as exc:
            log.exception("result check failed unexpectedly")
            record(SignatureRefused("check_error", repr(exc)), raw, headers={"id": task_id, "task": None},
                   signer=signer)
        return False
