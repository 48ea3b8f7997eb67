"""A tiny thread-safe labelled counter, rendered as Prometheus text.

Why: every refused message must be counted by reason so an operator sees an attack
or a misconfigured agent at a glance; the coordinator exposes these counters on its
metrics endpoint without pulling in a metrics library.
"""

from __future__ import annotations

import threading


class Counter:
    """Monotonic counters keyed by one label value (e.g. the refusal reason)."""

    def __init__(self, name: str, help_text: str, label: str = "reason") -> None:
        self.name = name
        self.help_text = help_text
        self.label = label
        self._values: dict[str, int] = {}
        self._lock = threading.Lock()

    def inc(self, label_value: str, amount: int = 1) -> None:
        with self._lock:
            self._values[label_value] = self._values.get(label_value, 0) + amount

    def get(self, label_value: str) -> int:
        with self._lock:
            return self._values.get(label_value, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def total(self) -> int:
        with self._lock:
            return sum(self._values.values())

    def prometheus_text(self) -> str:
        """Exposition format 0.0.4: HELP, TYPE and one sample per label value."""
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} counter"]
        for value, count in sorted(self.snapshot().items()):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{self.name}{{{self.label}="{escaped}"}} {count}')
        return "\n".join(lines) + "\n"


REFUSALS = Counter(
    "edgeledger_signing_refusals_total",
    "Messages refused by the signed-message checks, by reason.",
)
ACCEPTED = Counter(
    "edgeledger_signing_accepted_total",
    "Messages whose signature, certificate and freshness checks passed, by kind.",
    label="kind",
)


def prometheus_text() -> str:
    """All security counters, ready to append to a /metrics response."""
    return REFUSALS.prometheus_text() + ACCEPTED.prometheus_text()
