"""The coordinator's Prometheus metrics, on prometheus_client, one registry per coordinator.

Why prometheus_client: histograms with correct bucket semantics, exposition escaping,
the process collector and the content type come from the reference client instead of
a hand-written renderer. Why a registry object per `Metrics` (never the library's
global default registry): tests and tools run several coordinators or apps in one
process, and each must expose only its own series.

Why every labelled series is created up front: a series that appears only on its
first increment is invisible to `rate()` for that first event and to "absent" alerts.
Tasks, execution refusal reasons and signing refusal reasons are known in advance.

Values that live in files (journal lag, the agent registry, certificates) are read at
scrape time by collectors; the daemon wires them (coordinator/daemon.py).
This module is coordinator-only: the agent binary never imports prometheus_client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from security import metrics as security_metrics

log = logging.getLogger("edgeledger.coordinator.metrics")

# `*_created` samples double the output and no dashboard here uses them.
prometheus_client.disable_created_metrics()

PREFIX = "edgeledger_"
TASKS = ("edge.ingest", "edge.command_result", "edge.heartbeat", "edge.witness.cosign")
# Authentic tasks journaled as REJECTED (coordinator/ingest.py); signature refusals are
# edgeledger_signing_refusals_total.
EXECUTION_REFUSALS = ("identity_mismatch", "bad_payload", "duplicate_seq", "unknown_command", "unknown_checkpoint",
                      "cosignature_invalid")
AGENT_STATES = ("online", "stale", "never-seen", "revoked", "expired")
ANCHOR_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def build_version() -> str:
    try:
        return metadata.version("edgeledger")
    except metadata.PackageNotFoundError:
        return "unknown"


class FamilyCollector(Collector):
    """Scrape-time metric families from a function; a failing source is logged and skipped
    so one broken file never breaks the whole scrape."""

    def __init__(self, name: str, fn: Callable[[], Iterable[Metric]]) -> None:
        self.name = name
        self.fn = fn

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self.fn())
        except Exception as exc:  # noqa: BLE001 - keep every other series scrapeable
            log.warning("metrics source %s unavailable: %s", self.name, exc)
            return []

    def describe(self) -> Iterable[Metric]:
        return []  # names depend on the data; no registration-time collection


def security_families() -> list[Metric]:
    """security.metrics' counters (process-wide, kept agent-safe there) as Prometheus counters."""
    out: list[Metric] = []
    for counter in (security_metrics.REFUSALS, security_metrics.ACCEPTED):
        family = CounterMetricFamily(counter.name, counter.help_text, labels=[counter.label])
        for value, count in sorted(counter.snapshot().items()):
            family.add_metric([value], count)
        out.append(family)
    return out


class Metrics:
    """Every coordinator series on its own registry; `render()` is the /metrics body."""

    # Our names and labels are all legacy-valid, so the body is the classic text format;
    # say so, for scrapers that predate the 1.0.0 content type.
    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, version: str | None = None, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tasks_received = Counter(
            "edgeledger_tasks_received_total", "Tasks received from the broker, by task name", ["task"], registry=r)
        self.tasks_executed = Counter(
            "edgeledger_tasks_executed_total", "Tasks executed and journaled, by task name", ["task"], registry=r)
        self.tasks_duplicate = Counter(
            "edgeledger_tasks_duplicate_total", "Redelivered tasks recognised by id and not stored again, by task name",
            ["task"], registry=r)
        self.tasks_refused = Counter(
            "edgeledger_tasks_refused_total",
            "Authentic tasks journaled as REJECTED, by reason (signature refusals: edgeledger_signing_refusals_total)",
            ["reason"], registry=r)
        self.journal_write_failures = Counter(
            "edgeledger_journal_write_failures_total",
            "Tasks put back to the broker because the journal could not be written, by task name",
            ["task"], registry=r)
        self.ingest_latency = Histogram(
            "edgeledger_ingest_latency_seconds", "From the worker taking a task to its journal commit, by task name",
            ["task"], buckets=INGEST_BUCKETS, registry=r)
        self.anchor_latency = Histogram(
            "edgeledger_anchor_latency_seconds", "From journal append to on-chain confirmation, per journal row",
            buckets=ANCHOR_BUCKETS, registry=r)
        for task in TASKS:
            for metric in (self.tasks_received, self.tasks_executed, self.tasks_duplicate, self.ingest_latency,
                           self.journal_write_failures):
                metric.labels(task=task)
        for reason in EXECUTION_REFUSALS:
            self.tasks_refused.labels(reason=reason)
        self.build_info = Info("edgeledger_build", "Version of the running coordinator", registry=r)
        self.build_info.info({"version": version or build_version()})
        if process:
            ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        r.register(FamilyCollector("security", security_families))
        self._by_name: dict[str, Counter | Histogram] = {
            "edgeledger_tasks_received_total": self.tasks_received,
            "edgeledger_tasks_executed_total": self.tasks_executed,
            "edgeledger_tasks_duplicate_total": self.tasks_duplicate,
            "edgeledger_tasks_refused_total": self.tasks_refused,
            "edgeledger_journal_write_failures_total": self.journal_write_failures,
            "edgeledger_ingest_latency_seconds": self.ingest_latency,
            "edgeledger_anchor_latency_seconds": self.anchor_latency,
        }
        self._before_scrape: list[Callable[[], None]] = []

    # -- call sites (coordinator/ingest.py) -------------------------------------------
    def _metric(self, name: str) -> Counter | Histogram:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown metric {name!r}: known are {', '.join(sorted(self._by_name))}") from None

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        metric = self._metric(name)
        (metric.labels(**labels) if labels else metric).inc(amount)  # type: ignore[union-attr]

    def observe(self, name: str, value: float, **labels: str) -> None:
        metric = self._metric(name)
        (metric.labels(**labels) if labels else metric).observe(value)  # type: ignore[union-attr]

    def get(self, name: str, **labels: str) -> float:
        """Current value of one sample (0 when absent), e.g. get("edgeledger_tasks_refused_total", reason=...)."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    # -- wiring ---------------------------------------------------------------------
    def add_families(self, name: str, fn: Callable[[], Iterable[Metric]]) -> None:
        """Register scrape-time families (read from files at each scrape)."""
        self.registry.register(FamilyCollector(name, fn))

    def before_scrape(self, fn: Callable[[], None]) -> None:
        """Run `fn` before each render (e.g. feed new anchor latencies into the histogram)."""
        self._before_scrape.append(fn)

    def render(self) -> bytes:
        for fn in self._before_scrape:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a stale histogram beats a failed scrape
                log.warning("metrics refresh %s failed: %s", getattr(fn, "__name__", fn), exc)
        return generate_latest(self.registry)


def standard_metrics(version: str | None = None) -> Metrics:
    """The coordinator's instrumented series on a fresh registry (scrape-time ones are wired by the daemon)."""
    return Metrics(version)


# -- scrape-time sources the daemon wires -----------------------------------------------
class AnchorLatencyFeed:
    """Feeds rows confirmed since the last scrape into the anchor latency histogram.

    Why from the journal: the chain writer marks rows confirmed in the journal, which is
    the truth; starting at the rows already anchored when the coordinator started keeps
    the histogram a per-process count, like every other counter.
    """

    def __init__(self, journal_path: Path, histogram: Histogram, now: float | None = None) -> None:
        self.journal_path = journal_path
        self.histogram = histogram
        self.after = time.time() if now is None else now
        self.from_id = 0

    def __call__(self) -> None:
        from ledger.journal import anchored_since

        if not self.journal_path.exists():
            return
        latencies, self.after, self.from_id = anchored_since(self.journal_path, self.after, self.from_id)
        for value in latencies:
            self.histogram.observe(max(0.0, value))


def ledger_families(journal_path: Path, now: Callable[[], float] = time.time) -> list[Metric]:
    """Unanchored rows by state and the age of the oldest one (the anchoring lag)."""
    from ledger.journal import anchor_backlog, oldest_unanchored

    pending = GaugeMetricFamily("edgeledger_ledger_pending_rows", "Journal rows not yet confirmed on chain, by state",
                                labels=["state"])
    lag = GaugeMetricFamily("edgeledger_ledger_anchor_lag_seconds",
                            "Age of the oldest journal row not yet confirmed on chain (0 when all are anchored)")
    backlog = anchor_backlog(journal_path) if journal_path.exists() else {"pending": 0, "sent": 0}
    for state, n in sorted(backlog.items()):
        pending.add_metric([state], n)
    oldest = oldest_unanchored(journal_path) if journal_path.exists() else None
    lag.add_metric([], 0.0 if oldest is None else max(0.0, now() - oldest))
    return [pending, lag]


def agent_families(views: Iterable[object], issued: Iterable[object]) -> list[Metric]:
    """Per-agent series from registry views (coordinator.registry.AgentView) and issued certificates."""
    state = GaugeMetricFamily("edgeledger_agent_state", "1 for the agent's current state (online, stale, never-seen, "
                              "revoked, expired), 0 for the others", labels=["agent", "state"])
    last_seen = GaugeMetricFamily("edgeledger_agent_last_seen_timestamp_seconds",
                                  "Unix time the agent was last heard from", labels=["agent"])
    backlog = GaugeMetricFamily("edgeledger_agent_outbox_backlog",
                                "Outbox backlog the agent reported in its last heartbeat", labels=["agent"])
    readings = CounterMetricFamily("edgeledger_agent_readings_total",
                                   "Readings stored for the agent (agent registry)", labels=["agent"])
    expiry = GaugeMetricFamily("edgeledger_agent_certificate_expiry_timestamp_seconds",
                               "Certificate not-after (unix time): source=issued is the latest certificate the fleet "
                               "CA issued, source=presented the one the agent last signed with", labels=["agent", "source"])
    alarms = CounterMetricFamily("edgeledger_witness_alarms", "Witness alarms the agent reported in its last heartbeat: "
                                 "inconsistent log checkpoints or confirmed readings not provably in the log",
                                 labels=["agent"])
    takeovers = CounterMetricFamily("edgeledger_agent_takeovers_total",
                                    "Connections the agent reports it lost to another device using its agent id "
                                    "(duplicate identity; from its heartbeat)", labels=["agent"])
    agents = GaugeMetricFamily("edgeledger_agents", "Agents by state", labels=["state"])
    by_state = dict.fromkeys(AGENT_STATES, 0)
    for v in views:
        agent = v.agent_id  # type: ignore[attr-defined]
        by_state[v.status] = by_state.get(v.status, 0) + 1  # type: ignore[attr-defined]
        for s in AGENT_STATES:
            state.add_metric([agent, s], 1.0 if v.status == s else 0.0)  # type: ignore[attr-defined]
        if v.last_seen is not None:  # type: ignore[attr-defined]
            last_seen.add_metric([agent], float(v.last_seen))  # type: ignore[attr-defined]
        backlog.add_metric([agent], float(v.outbox_backlog or 0))  # type: ignore[attr-defined]
        readings.add_metric([agent], float(v.readings))  # type: ignore[attr-defined]
        alarms.add_metric([agent], float(getattr(v, "witness_alarms", None) or 0))
        takeovers.add_metric([agent], float(getattr(v, "takeovers", None) or 0))
        if getattr(v, "presented_not_after", None) is not None:
            expiry.add_metric([agent, "presented"], float(v.presented_not_after))  # type: ignore[attr-defined]
    for cert in issued:
        expiry.add_metric([cert.name, "issued"], float(cert.not_after))  # type: ignore[attr-defined]
    for s, n in by_state.items():
        agents.add_metric([s], n)
    return [agents, state, last_seen, backlog, readings, alarms, expiry, takeovers]


def child_families(children: Iterable[tuple[str, bool]]) -> list[Metric]:
    up = GaugeMetricFamily("edgeledger_child_up", "1 when a supervised child process is running", labels=["child"])
    for name, alive in children:
        up.add_metric([name], 1.0 if alive else 0.0)
    return [up]
