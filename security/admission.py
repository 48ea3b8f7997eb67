"""Admission of one incoming task message: every check it must pass, in order.

Why its own object: verification (security.verifier) says who signed what; admission
says whether THIS worker may run it: content type, signature, header binding, the
allowed signers, the routing key it was delivered with, the eta limit, the role
policy and the replay guard. Each check raises `SignatureRefused` with a reason;
`Admission.admit` records the first refusal once and returns None.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from .codec import CONTENT_TYPE, SIGNED_HEADERS, VerifiedMessage, parse_eta, task_body
from .policy import Policy, TaskMessage
from .replay import ReplayGuard
from .signing import SignatureRefused, SigningError
from .signing_config import SigningConfig
from .verifier import Verifier

log = logging.getLogger("edgeledger.security")


@dataclass(frozen=True)
class Delivery:
    """How a message reached this worker: the routing key it was delivered with and the
    names/routing keys of the queues this worker consumes (empty: not known)."""

    routing_key: str | None
    queues: frozenset[str] = frozenset()


def replay_key(signer: str, task_id: Any, retries: Any) -> str:
    """Replay-guard key: per signer, so one signer's messages never block another's ids."""
    return f"{signer}/{task_id}:{retries or 0}"


def check_binding(vm: VerifiedMessage, headers: dict[str, Any]) -> None:
    """The signed copy of the header fields must equal the headers that drive execution."""
    if vm.kind != "task" or not vm.meta:
        raise SignatureRefused("unbound", "signed body carries no task binding (not sent through a signing app?)")
    for name in SIGNED_HEADERS:
        got, signed = headers.get(name), vm.meta.get(name)
        if name == "retries":
            got, signed = got or 0, signed or 0
        if got != signed:
            raise SignatureRefused("header_mismatch", f"header {name}={got!r} differs from the signed {signed!r}")


def check_routing(vm: VerifiedMessage, delivery: Delivery) -> None:
    """The signed routing key must be the one the message was delivered with, and name a
    queue this worker consumes (a message signed for agent B's queue cannot be replayed
    into agent C's, nor a command into the ingest queue)."""
    signed = (vm.meta or {}).get("routing_key")
    if not signed:
        raise SignatureRefused("routing_key_mismatch", "message was signed without a routing key")
    if signed != delivery.routing_key:
        raise SignatureRefused(
            "routing_key_mismatch", f"signed for routing key {signed!r}, delivered with {delivery.routing_key!r}"
        )
    if delivery.queues and signed not in delivery.queues:
        raise SignatureRefused(
            "routing_key_mismatch", f"signed for {signed!r}; this worker consumes {', '.join(sorted(delivery.queues))}"
        )


def check_delay(vm: VerifiedMessage, limit: float) -> None:
    """A received task's eta may lie at most `limit` seconds after it was sent."""
    if vm.eta is not None and vm.eta - vm.sent_at > limit:
        raise SignatureRefused(
            "eta_too_far", f"eta is {vm.eta - vm.sent_at:.0f}s after sending; limit max_delay_seconds={limit:g}"
        )


def check_send_delay(task: str, eta_header: Any, limit: float) -> None:
    """Refuse to send what the receiver would refuse as `eta_too_far`."""
    eta = parse_eta(eta_header) if eta_header else None
    if eta is not None and eta - time.time() > limit:
        raise SigningError(
            f"task {task} is scheduled {eta - time.time():.0f}s ahead (eta {eta_header}), beyond "
            f"max_delay_seconds={limit:g}: receivers refuse it as eta_too_far. Schedule it at most {limit:g}s "
            "ahead (re-send later), or raise max_delay_seconds in the SigningConfig of sender and receiver"
        )


@dataclass
class Admission:
    """One app's admission of incoming task messages (its settings, policy, replay guard)."""

    config: SigningConfig
    verifier: Verifier
    policy: Policy
    guard: ReplayGuard

    def admit(self, headers: dict[str, Any], body: bytes | str, content_type: str | None,
              delivery: Delivery | None = None) -> VerifiedMessage | None:
        """Every check an incoming task message must pass, in order; None when refused.

        A refusal is logged, counted and quarantined here, once. delivery: how the
        message arrived (the worker always passes it; without it the routing-key check
        is skipped, for unit tests of the other checks).
        """
        signer_id: str | None = None
        try:
            if content_type != CONTENT_TYPE:
                raise SignatureRefused("unsigned", f"content type {content_type!r} is not {CONTENT_TYPE}")
            # re-sendable tasks are idempotent at the consumer: a broker backlog older than
            # max_age is stored, not refused (the signed task name must match, check_binding)
            resendable = str(headers.get("task")) in self.config.resend_tasks
            max_age = self.config.resend_max_age_seconds if resendable else None
            vm = self.verifier.verify(body, max_age=max_age)
            signer_id = vm.signer.agent_id
            check_binding(vm, headers)
            args, kwargs, embed = task_body(vm)
            allowed = self.config.allowed_signers
            if allowed is not None and signer_id not in allowed:
                raise SignatureRefused("signer_not_allowed", f"{signer_id!r} may not send tasks to this worker")
            if delivery is not None:
                check_routing(vm, delivery)
            check_delay(vm, self.config.max_delay_seconds)
            refusal = self.policy.check(TaskMessage(
                task=str(headers.get("task")), task_id=str(headers.get("id")), signer=signer_id,
                args=tuple(args), kwargs=kwargs, embed=embed, headers=headers, sent_at=vm.sent_at, eta=vm.eta,
            ))
            if refusal is not None:
                raise SignatureRefused(refusal.reason, refusal.detail)
            self.guard.accept(replay_key(signer_id, headers.get("id"), headers.get("retries")),
                              vm.signer.envelope_digest, vm.sent_at, signer_id, eta=vm.eta,
                              allow_resend=resendable, max_age=max_age)
        except SignatureRefused as exc:
            self.verifier.record(exc, body, headers=headers, signer=signer_id)
            return None
        except Exception as exc:
            log.exception("signature check failed unexpectedly")
            self.verifier.record(SignatureRefused("check_error", repr(exc)), body, headers=headers, signer=signer_id)
            return None
        return vm
