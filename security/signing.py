"""Signer identity as seen by a task, and the errors of the signed-message checks.

Why: a task must know WHO signed the message that started it (certificate CN), so an
agent can never claim readings for another agent; `SignerInfo` is that answer and
security.app_signing.ensure_bound the check. No imports beyond the standard library,
so every security module can share these types without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass


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
