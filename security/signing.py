"""Signer identity as seen by a task, and the errors of the signed-message checks.

Why: a task must know WHO signed the message that started it (certificate CN), so an
agent can never claim readings for another agent. `ensure_bound` is that check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("edgeledger.security")


class SigningError(Exception):
    """Signing could not be set up or a message could not be signed."""


class SignatureRefused(Exception):
    """A message failed a check; `reason` is a short metric label, the message says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class IdentityMismatch(SignatureRefused):
    """The payload claims an agent id other than the signer's certificate CN."""

    def __init__(self, detail: str) -> None:
        super().__init__("identity_mismatch", detail)


@dataclass(frozen=True)
class SignerInfo:
    """Who signed the message: exposed to tasks as `self.request.signer`."""

    agent_id: str
    fingerprint: str
    envelope_digest: str
    envelope: bytes
    certificate_pem: str

    def __repr__(self) -> str:  # keep logs short: no envelope bytes or PEM
        return f"SignerInfo(agent_id={self.agent_id!r}, fingerprint={self.fingerprint[:16]}...)"


def _record(exc: SignatureRefused, signer: SignerInfo | None) -> None:
    """Log, count and quarantine with the settings of the running task's app (no state here)."""
    try:
        from .celery_signing import record_for_current_task
    except ImportError:  # Celery not installed: nobody to record with but the log
        log.warning("refused message: %s", exc)
        return
    record_for_current_task(exc, signer)


def ensure_bound(signer: SignerInfo | None, claimed_agent_id: str) -> SignerInfo:
    """Raise IdentityMismatch unless the message was signed by `claimed_agent_id`.

    The refusal is recorded (counted, quarantined with the envelope) before raising.
    """
    if signer is None:
        exc = IdentityMismatch(f"message claims agent {claimed_agent_id!r} but carries no verified signer")
    elif signer.agent_id != claimed_agent_id:
        exc = IdentityMismatch(
            f"message signed by {signer.agent_id!r} claims agent {claimed_agent_id!r}"
        )
    else:
        return signer
    _record(exc, signer)
    raise exc
