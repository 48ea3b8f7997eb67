"""Refusal and acceptance counts of the signed-message checks, by label.

Why no metrics library here: this module is on the device agent's import path (the
PyInstaller binary), which must stay small, so it only counts. The coordinator turns
these counts into Prometheus series with prometheus_client (coordinator/metrics.py
reads `snapshot()` at scrape time); call sites stay `REFUSALS.inc(reason)` and
`ACCEPTED.inc(kind)`.

Every known label value is present from the start with 0, so a dashboard or alert on
`edgeledger_signing_refusals_total{reason="cert_revoked"}` has a series before the
first refusal (a series that appears only on its first increment hides the first
event from rate() and from "absent" alerts).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

# The shared vocabulary (quarantine `reason` column and the metric label); a reason not
# listed here is still counted, it just has no series before its first increment.
REFUSAL_REASONS: tuple[str, ...] = (
    "malformed", "oversize", "unsigned", "bad_signature", "cert_untrusted", "cert_expired",
    "cert_not_yet_valid", "cert_revoked", "unbound", "header_mismatch", "signer_not_allowed",
    "stale", "replay", "identity_mismatch", "check_error",
    "task_not_allowed", "canvas_refused", "id_not_bound", "routing_key_mismatch", "unknown_task",
    "not_a_task", "eta_too_far", "result_unbound", "result_replay", "unknown_command",
)
ACCEPTED_KINDS: tuple[str, ...] = ("task", "data")


class Counter:
    """Monotonic counters keyed by one label value (e.g. the refusal reason); thread-safe."""

    def __init__(self, name: str, help_text: str, label: str = "reason", known: Iterable[str] = ()) -> None:
        self.name = name
        self.help_text = help_text
        self.label = label
        self.known: tuple[str, ...] = tuple(known)
        self._values: dict[str, int] = dict.fromkeys(self.known, 0)
        self._lock = threading.Lock()

    def inc(self, label_value: str, amount: int = 1) -> None:
        with self._lock:
            self._values[label_value] = self._values.get(label_value, 0) + amount

    def get(self, label_value: str) -> int:
        with self._lock:
            return self._values.get(label_value, 0)

    def snapshot(self) -> dict[str, int]:
        """Every known label value (0 until counted) and every value counted since."""
        with self._lock:
            return dict(self._values)

    def total(self) -> int:
        with self._lock:
            return sum(self._values.values())


REFUSALS = Counter(
    "edgeledger_signing_refusals_total",
    "Messages refused by the signed-message checks, by reason.",
    known=REFUSAL_REASONS,
)
ACCEPTED = Counter(
    "edgeledger_signing_accepted_total",
    "Messages whose signature, certificate and freshness checks passed, by kind.",
    label="kind",
    known=ACCEPTED_KINDS,
)
