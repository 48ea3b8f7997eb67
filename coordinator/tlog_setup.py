"""The coordinator's log key and origin, from its data dir (used by `init`, `run` and `erase`).

Why here: the origin is derived from the fleet CA and the coordinator identity, both
known only to the coordinator's config; ledger.logkey knows nothing of coordinators.
"""

from __future__ import annotations

from ledger.logkey import LogKeyError, ensure_log_key, log_origin
from ledger.tlog.note import Ed25519Signer

from .config import CoordinatorConfig
from .errors import CoordinatorError


def coordinator_log_key(cfg: CoordinatorConfig) -> Ed25519Signer:
    """pki/log.key (created 0600 with pki/log.pub on first use: existing data dirs get one lazily)."""
    try:
        origin = log_origin(cfg.ca_path.read_bytes(), cfg.identity)
        return ensure_log_key(cfg.pki_dir, origin)
    except OSError as exc:
        raise CoordinatorError(f"cannot read the fleet CA {cfg.ca_path} ({exc.strerror}): run `edge-coordinator init`") from None
    except LogKeyError as exc:
        raise CoordinatorError(str(exc)) from None
