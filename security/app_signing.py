"""Where an app's signing state lives, and how code without an app finds a verifier.

Why: everything signing keeps is held per app (`SigningContext`, an attribute of the
Celery app set by security.signing_setup), so an agent and a coordinator app can
live in one process each with its own identity, trust anchors and policy. Code that
has no app at hand (a refusal raised inside a running task, app-less decodes) asks
here: the running task's app first, the process default (security.serializers) last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery

from .admission import Admission, Delivery
from .codec import Identity, VerifiedMessage
from .policy import Policy
from .replay import ReplayGuard
from .serializers import PROCESS
from .signing import IdentityMismatch, SignatureRefused, SignerInfo, SigningError
from .signing_config import SigningConfig
from .verifier import Verifier

log = logging.getLogger("edgeledger.security")

CONTEXT_ATTR = "_edgeledger_signing"  # where an app keeps its SigningContext


@dataclass
class SigningContext:
    """Everything signing keeps for one app (held on the app itself, nothing global)."""

    config: SigningConfig
    serializer: str
    guard: ReplayGuard
    identity: Identity
    agent_id: str
    verifier: Verifier
    policy: Policy
    admission: Admission

    def admit(self, headers: dict[str, Any], body: bytes | str, content_type: str | None,
              delivery: Delivery | None = None) -> VerifiedMessage | None:
        """security.admission.Admission.admit with this app's settings."""
        return self.admission.admit(headers, body, content_type, delivery)


def signing_context(app: Celery | None) -> SigningContext | None:
    """The signing state of `app`, or None when setup_signing was not called for it."""
    return getattr(app, CONTEXT_ATTR, None) if app is not None else None


def attach(app: Celery, ctx: SigningContext) -> None:
    """Hold `ctx` on `app` (security.signing_setup)."""
    setattr(app, CONTEXT_ATTR, ctx)


def get_verifier(app: Celery | None = None) -> Verifier:
    """The verifier of `app`, or the process default (the last app set up) for decodes
    that come with no app (results, control replies)."""
    ctx = signing_context(app)
    if ctx is not None:
        return ctx.verifier
    return PROCESS.verifier()


def admit(app: Celery, headers: dict[str, Any], body: bytes | str, content_type: str | None,
          delivery: Delivery | None = None) -> VerifiedMessage | None:
    """Every check an incoming task message must pass, in order; None when refused.

    delivery: how the message arrived (the worker always passes it; without it the
    routing-key check is skipped, for unit tests of the other checks).
    """
    ctx = signing_context(app)
    if ctx is None:
        raise SigningError("setup_signing was not called for this app")
    return ctx.admit(headers, body, content_type, delivery)


def record_for_current_task(exc: SignatureRefused, signer: SignerInfo | None) -> None:
    """Record a refusal raised inside a running task (ensure_bound) with the settings of
    that task's app (the process default outside a task)."""
    from celery._state import get_current_task

    headers: dict[str, Any] = {}
    task = get_current_task()
    ctx = None
    if task is not None and task.request is not None and task.request.id:
        headers = {"id": task.request.id, "task": task.name}
        ctx = signing_context(task.app)
    verifier = ctx.verifier if ctx is not None else PROCESS.default_verifier
    if verifier is None:
        log.warning("refused message: %s", exc)
        return
    verifier.record(exc, signer.envelope if signer else None, headers=headers,
                    signer=signer.agent_id if signer else None)


def ensure_bound(signer: SignerInfo | None, claimed_agent_id: str) -> SignerInfo:
    """Raise IdentityMismatch unless the message was signed by `claimed_agent_id`.

    Why: a task must know WHO signed the message that started it, so an agent can
    never claim readings for another agent. The refusal is recorded (counted,
    quarantined with the envelope) before raising.
    """
    if signer is None:
        exc = IdentityMismatch(f"message claims agent {claimed_agent_id!r} but carries no verified signer")
    elif signer.agent_id != claimed_agent_id:
        exc = IdentityMismatch(
            f"message signed by {signer.agent_id!r} claims agent {claimed_agent_id!r}"
        )
    else:
        return signer
    record_for_current_task(exc, signer)
    raise exc
