"""Prometheus text metrics without a client library.

Why: the daemon needs a handful of counters and gauges, thread-safe, rendered in the
text exposition format; a dependency for that is not worth it on a small host.
Gauges that are cheap to compute on demand (ledger lag, per-agent last seen) are
registered as callbacks and evaluated at scrape time.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable, Iterable

LabelKey = tuple[tuple[str, str], ...]
Sample = tuple[dict[str, str], float]


def _labels(labels: LabelKey) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + body + "}"


def _num(value: float) -> str:
    """Exact enough for unix timestamps (`:g` would round them to 6 digits)."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Counters, gauges, a latency summary and scrape-time gauge callbacks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[LabelKey, float]] = defaultdict(dict)
        self._observations: dict[str, list[float]] = defaultdict(list)
        self._callbacks: dict[str, Callable[[], Iterable[Sample]]] = {}
        self._extra: list[Callable[[], str]] = []

    def describe(self, name: str, kind: str, help_text: str) -> None:
        self._help[name] = (kind, help_text)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = float(value)

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def total(self, name: str) -> float:
        with self._lock:
            return sum(self._values[name].values())

    def observe(self, name: str, value: float, keep: int = 4096) -> None:
        """Keep recent observations for a summary (quantiles over the last `keep`)."""
        with self._lock:
            obs = self._observations[name]
            obs.append(value)
            if len(obs) > keep:
                del obs[: len(obs) - keep]

    def gauge_callback(self, name: str, fn: Callable[[], Iterable[Sample]]) -> None:
        self._callbacks[name] = fn

    def extra_text(self, fn: Callable[[], str]) -> None:
        """Append another component's ready-made exposition text (security's counters)."""
        self._extra.append(fn)

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            values = {k: dict(v) for k, v in self._values.items()}
            observations = {k: list(v) for k, v in self._observations.items()}
        for name, series in sorted(values.items()):
            self._header(out, name)
            for key, value in sorted(series.items()):
                out.append(f"{name}{_labels(key)} {_num(value)}")
        for name, obs in sorted(observations.items()):
            self._header(out, name, default_kind="summary")
            ordered = sorted(obs)
            for q in (0.5, 0.9, 0.99):
                v = ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0
                out.append(f'{name}{{quantile="{q}"}} {_num(v)}')
            out.append(f"{name}_count {len(obs)}")
            out.append(f"{name}_sum {_num(sum(obs))}")
        for name, fn in sorted(self._callbacks.items()):
            try:
                samples = list(fn())
            except Exception as exc:  # a broken gauge must not break the scrape
                out.append(f"# {name} unavailable: {type(exc).__name__}")
                continue
            self._header(out, name, default_kind="gauge")
            for labels, value in samples:
                out.append(f"{name}{_labels(tuple(sorted(labels.items())))} {_num(value)}")
        text = "\n".join(out) + "\n"
        for fn in self._extra:
            try:
                text += fn()
            except Exception as exc:  # a broken source must not break the scrape
                text += f"# extra metrics unavailable: {type(exc).__name__}\n"
        return text

    def _header(self, out: list[str], name: str, default_kind: str = "counter") -> None:
        kind, help_text = self._help.get(name, (default_kind, name))
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")


def standard_metrics() -> Metrics:
    """The coordinator's metric names, described once."""
    m = Metrics()
    m.describe("edge_tasks_received_total", "counter", "Tasks received from the broker, by task name")
    m.describe("edge_tasks_executed_total", "counter", "Tasks executed and journaled, by task name")
    m.describe("edge_tasks_duplicate_total", "counter", "Redelivered tasks recognised by id and not stored again")
    m.describe("edge_tasks_refused_total", "counter", "Authentic tasks refused at execution (identity_mismatch, bad_payload, duplicate_seq); signature refusals are edgeledger_signing_refusals_total")
    m.describe("edge_ledger_pending_rows", "gauge", "Journal rows not yet confirmed on chain (ledger lag)")
    m.describe("edge_anchor_latency_seconds", "summary", "From journal append to on-chain confirmation")
    m.describe("edge_agent_last_seen_timestamp", "gauge", "Unix time the agent was last heard from")
    m.describe("edge_agent_outbox_backlog", "gauge", "Outbox backlog the agent reported in its last heartbeat")
    m.describe("edge_child_up", "gauge", "1 when a supervised child process is running")
    return m
