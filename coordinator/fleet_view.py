"""What the fleet page shows, read from the coordinator's files (read-only, every request).

Why a separate read model: the page renderer (coordinator/fleet_page.py) stays a pure
function of a `FleetSnapshot`, testable without files, and the same agent views feed
the per-agent metrics. Nothing here writes: the journal and the quarantine are opened
read-only, so a page load never disturbs the ingest worker.

Hooks for work that lands later: `AgentRow.gaps` / `AgentRow.dropped` (the receipts
issue fills them; None renders as "n/a") and `FleetSnapshot.checkpoint` (the tlog work
supplies a provider through `gather(..., checkpoint=...)`; None renders as "n/a").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ledger.journal import activity_since, agent_activity, anchor_backlog, oldest_unanchored
from security.quarantine import QuarantinedMessage, read_summary

from .config import CoordinatorConfig
from .fleet_pki import FleetStore
from .health import CheckResult
from .registry import AgentView, list_agents

RATE_WINDOW = 300.0  # seconds over which the page's rates are averaged
PLOT_WINDOW = 1800.0  # seconds of readings history in the plot, at most
PLOT_WINDOWS = (60.0, 120.0, 300.0, 600.0, 900.0, PLOT_WINDOW)  # the shortest that holds every reading shown
PLOT_BUCKETS = 60


@dataclass
class AgentRow:
    view: AgentView
    readings_per_min: float
    gaps: int | None = None  # hook: filled by the receipts work (seq gaps seen by the coordinator)
    dropped: int | None = None  # hook: filled by the receipts work (readings the agent dropped)


@dataclass
class FleetSnapshot:
    now: float
    agents: list[AgentRow]
    ingest_per_min: float
    anchor_per_min: float
    pending: dict[str, int]
    anchor_lag: float | None  # seconds since the oldest unanchored row was journaled; None: all anchored
    anchor_lag_max: float
    refusals: dict[str, int]
    recent_refusals: list[QuarantinedMessage]
    plot_start: float
    plot_step: float
    series: dict[str, list[int]]  # agent -> readings per plot bucket
    health: dict[str, CheckResult] = field(default_factory=dict)
    checkpoint: dict[str, str] | None = None  # hook: latest checkpoint/audit state from the tlog work
    refresh_seconds: int = 10


CheckpointProvider = Callable[[], "dict[str, str] | None"]


def latest_issued(store: FleetStore) -> list:
    """The newest issued certificate per agent (reserved identities left out)."""
    reserved = {*store.cfg.coordinator_identities, "broker"}
    latest: dict[str, object] = {}
    for cert in store.issued():
        if cert.name not in reserved:
            latest[cert.name] = cert  # issued.json is in issue order
    return list(latest.values())


def gather(
    cfg: CoordinatorConfig,
    store: FleetStore,
    *,
    health: dict[str, CheckResult] | None = None,
    checkpoint: CheckpointProvider | None = None,
    now: float | None = None,
) -> FleetSnapshot:
    now = time.time() if now is None else now
    journal = cfg.journal_path
    views = list_agents(store, journal, now=now)
    have_journal = journal.exists()
    times_by_agent = {
        v.agent_id: agent_activity(journal, v.agent_id, now - PLOT_WINDOW, "edge.ingest") if have_journal else []
        for v in views
    }
    earliest = min((t[0] for t in times_by_agent.values() if t), default=now - PLOT_WINDOW)
    window = next((w for w in PLOT_WINDOWS if w >= now - earliest), PLOT_WINDOW)  # zoom in on a young fleet
    plot_step = window / PLOT_BUCKETS
    plot_start = now - window
    rows: list[AgentRow] = []
    series: dict[str, list[int]] = {}
    for view in views:
        times = [t for t in times_by_agent[view.agent_id] if t >= plot_start]
        buckets = [0] * PLOT_BUCKETS
        for t in times:
            buckets[min(PLOT_BUCKETS - 1, max(0, int((t - plot_start) // plot_step)))] += 1
        recent = sum(1 for t in times_by_agent[view.agent_id] if t >= now - RATE_WINDOW)
        rows.append(AgentRow(view=view, readings_per_min=recent * 60.0 / RATE_WINDOW, gaps=view.gaps,
                             dropped=view.dropped))
        if times:
            series[view.agent_id] = buckets
    journaled, anchored = activity_since(journal, now - RATE_WINDOW) if have_journal else (0, 0)
    oldest = oldest_unanchored(journal) if have_journal else None
    refusals, recent_refusals = read_summary(cfg.quarantine_path, recent=10)
    return FleetSnapshot(
        now=now,
        agents=rows,
        ingest_per_min=journaled * 60.0 / RATE_WINDOW,
        anchor_per_min=anchored * 60.0 / RATE_WINDOW,
        pending=anchor_backlog(journal) if have_journal else {"pending": 0, "sent": 0},
        anchor_lag=None if oldest is None else max(0.0, now - oldest),
        anchor_lag_max=cfg.monitor.anchor_lag_max,
        refusals=refusals,
        recent_refusals=recent_refusals,
        plot_start=plot_start,
        plot_step=plot_step,
        series=series,
        health=health or {},
        checkpoint=checkpoint() if checkpoint is not None else None,
    )
