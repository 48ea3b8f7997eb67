"""Where one process's signing identity and trust anchors live, and its refusal limits.

Why its own module: agent, coordinator, simulator and tests build a SigningConfig
without needing Celery's worker classes; setup (security.signing_setup) turns it into
an app's signing state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .policy import Policy
from .signing import SigningError


@dataclass
class SigningConfig:
    """Where this process's identity and trust anchors live, the refusal limits, and
    the role policy of the tasks this app consumes."""

    key_path: Path
    cert_path: Path
    ca_path: Path
    crl_path: Path | None = None
    replay_db: Path | None = None  # default: <key dir>/replay.sqlite
    quarantine_db: Path | None = None  # default: <key dir>/quarantine.sqlite
    max_age_seconds: float = 300.0
    max_message_bytes: int = 256 * 1024
    allowed_signers: frozenset[str] | None = None  # CNs allowed to send tasks here (None: any fleet cert)
    rpc_reply_exchange: str | None = "c.rep"  # rpc:// results via this exchange (broker ACL); None: stock rpc
    policy: Policy | None = None  # role policy (security.policy); always on top of the baseline
    max_delay_seconds: float = 86400.0  # eta/countdown limit, checked when sent and when received
    # Tasks whose consumer dedupes by task id (the coordinator's journal): a NEW envelope
    # under an accepted id is a sender's re-send, let through; the same envelope twice
    # stays a `replay` (security.replay). Empty: every id is accepted once.
    resend_tasks: frozenset[str] = frozenset()
    # Freshness bound for those same tasks. Why longer than max_age_seconds: they are
    # idempotent at the consumer (deduped by task id), so an old copy can do no harm,
    # while refusing it would turn a broker backlog older than max_age_seconds (a
    # coordinator down or behind for minutes) into quarantine and make every agent send
    # it all again. A message older than this is still refused as `stale`.
    resend_max_age_seconds: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        self.key_path, self.cert_path, self.ca_path = Path(self.key_path), Path(self.cert_path), Path(self.ca_path)
        self.crl_path = Path(self.crl_path) if self.crl_path else None
        base = self.key_path.parent
        self.replay_db = Path(self.replay_db) if self.replay_db else base / "replay.sqlite"
        self.quarantine_db = Path(self.quarantine_db) if self.quarantine_db else base / "quarantine.sqlite"
        if self.allowed_signers is not None:
            self.allowed_signers = frozenset(self.allowed_signers)
        if self.max_age_seconds <= 0 or self.max_message_bytes <= 0 or self.max_delay_seconds < 0:
            raise SigningError("max_age_seconds and max_message_bytes must be positive, max_delay_seconds not negative")
        if self.resend_max_age_seconds < self.max_age_seconds:
            raise SigningError("resend_max_age_seconds must be at least max_age_seconds")
