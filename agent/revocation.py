"""This device's own revocation: detect it, remember it, stop retrying.

Why: a revoked agent used to reconnect forever. It now learns it is revoked in two
ways: the broker ends the TLS handshake with `certificate revoked` (security.refusal),
or a CRL it installed (signed by the fleet CA) lists its own certificate serial. It
then records the fact in the outbox's meta table (the unsent readings stay: an
operator may still want them), stops, and exits with EXIT_REVOKED, which the systemd
unit lists in RestartPreventExitStatus=. `run` refuses to start while the mark is
set; `enroll` with a new certificate clears it; `status` shows it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .config import AgentConfig
from .errors import AgentError

#: Exit status of `edge-agent run` when this device is revoked (EX_CONFIG; see
#: packaging/edge-agent.service RestartPreventExitStatus=78).
EXIT_REVOKED = 78
META_KEY = "revoked"
FIX = ("re-enroll this device (edge-agent keygen --force, have the coordinator sign the CSR with "
       "`edge-coordinator enroll CSR --force`, "
       "edge-agent enroll) or contact the fleet operator")


class AgentRevoked(AgentError):
    """This device's certificate is revoked: nothing but re-enrollment helps."""


def _outbox(cfg: AgentConfig) -> Any:
    from .outbox import Outbox

    return Outbox(cfg.outbox_file, cfg.agent_id, cfg.outbox_max)


def mark_revoked(cfg: AgentConfig, reason: str, detail: str) -> dict[str, Any]:
    state = {"reason": reason, "detail": detail, "at": time.time()}
    box = _outbox(cfg)
    try:
        box.set_meta(META_KEY, json.dumps(state, sort_keys=True))
    finally:
        box.close()
    return state


def revoked_state(cfg: AgentConfig) -> dict[str, Any] | None:
    """The persisted mark, or None. Never creates the outbox."""
    if not cfg.outbox_file.exists() or not cfg.agent_id:
        return None
    box = _outbox(cfg)
    try:
        raw = box.get_meta(META_KEY)
    finally:
        box.close()
    if not raw:
        return None
    try:
        return dict(json.loads(raw))
    except (ValueError, TypeError):
        return {"reason": "unknown", "detail": raw, "at": None}


def clear_revoked(cfg: AgentConfig) -> None:
    if not cfg.outbox_file.exists() or not cfg.agent_id:
        return
    box = _outbox(cfg)
    try:
        box.delete_meta(META_KEY)
    finally:
        box.close()


def own_serial(cfg: AgentConfig) -> int | None:
    from security import pki

    if not cfg.cert_file.exists():
        return None
    try:
        return pki.load_certificate(cfg.cert_file).serial_number
    except pki.PKIError:
        return None


def listed_in_local_crl(cfg: AgentConfig) -> bool:
    """True when the installed CRL (verified against the fleet CA) lists this device."""
    from security.crl import CrlError, check_signed_by, lists_serial, parse_crl
    from security.pki import PKIError, load_certificate

    serial = own_serial(cfg)
    if serial is None or not cfg.crl_file.exists() or not cfg.ca_file.exists():
        return False
    try:
        crl = parse_crl(cfg.crl_file.read_bytes())
        check_signed_by(crl, load_certificate(cfg.ca_file))
    except (CrlError, PKIError, OSError):
        return False  # an unusable CRL proves nothing about us; commands are refused on it anyway
    return lists_serial(crl, serial)


def refuse_if_revoked(cfg: AgentConfig) -> None:
    """Called by `run` before anything connects: raise AgentRevoked with the fix."""
    state = revoked_state(cfg)
    if state is None and listed_in_local_crl(cfg):
        state = mark_revoked(cfg, "crl", "the installed fleet CRL lists this device's certificate")
    if state is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(state["at"])) if state.get("at") else "earlier"
        raise AgentRevoked(f"this device is revoked ({state.get('detail') or state.get('reason')}, noticed {when}): {FIX}")
