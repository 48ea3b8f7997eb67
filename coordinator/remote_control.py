"""Remote control of the coordinator's worker: only its own identity may command it.

Why a second lock behind the broker's: `celery control shutdown`, `pool_restart` or
`revoke` stop ingestion, and the worker's pidbox accepts any message whose signature
chains to the fleet CA, which every agent certificate does. The broker already gives
the pidbox topics to coordinator certificates only (security.dynsec /
security.mosquitto_config); this check keeps that true if an ACL is ever widened by
mistake: a control message must be signed by a coordinator identity, or it is
refused (`signer_not_allowed`), quarantined and counted like every other refusal.
"""

from __future__ import annotations

from typing import Any

from kombu import pidbox

from security.codec import CONTENT_TYPE
from security.signing import SignatureRefused
from security.verifier import Verifier

REFUSAL = "signer_not_allowed"


def operator_only_node(verifier: Verifier, allowed: frozenset[str]) -> type[pidbox.Node]:
    """A kombu Mailbox node class that runs control commands signed by `allowed` CNs only.

    Install with ``app.control.mailbox.node_cls = operator_only_node(...)`` before the
    worker starts (Celery builds the worker's pidbox node through it).
    """

    class OperatorOnlyNode(pidbox.Node):
        def handle_message(self, body: Any, message: Any = None) -> Any:
            refusal = signer_refusal(verifier, allowed, message)
            if refusal is not None:
                verifier.record(refusal, getattr(message, "body", None),
                                headers={"task": f"pidbox:{body.get('method') if isinstance(body, dict) else '?'}"})
                return None
            return super().handle_message(body, message)

    return OperatorOnlyNode


def signer_refusal(verifier: Verifier, allowed: frozenset[str], message: Any) -> SignatureRefused | None:
    """None when `message` is signed by an allowed identity; else the refusal (fails closed)."""
    if message is None or getattr(message, "content_type", None) != CONTENT_TYPE:
        return SignatureRefused("unsigned", "control message is not signed: remote control takes signed messages only")
    try:
        signer = verifier.verify(message.body).signer.agent_id  # cached: the decoder verified it already
    except SignatureRefused as exc:
        return exc
    if signer not in allowed:
        return SignatureRefused(REFUSAL, f"{signer!r} may not use remote control: only the coordinator identity "
                                         f"({', '.join(sorted(allowed))}) may; operators run `celery -A coordinator.tooling`")
    return None
