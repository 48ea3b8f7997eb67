"""The fleet page: one server-rendered HTML document with an inline SVG plot.

Why server-rendered with no script: it needs no build toolchain and no vendored
library, refreshes itself with a meta refresh, and can be served under a
Content-Security-Policy that forbids every script. Agent ids and quarantine details
are attacker-controlled strings (a certificate CN, a refused message's text), so every
value goes through `_e()` (html.escape with quotes) before it reaches the page, in
HTML and SVG alike.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable

from .fleet_view import AgentRow, FleetSnapshot

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
STATE_CLASS = {"online": "ok", "stale": "warn", "never-seen": "muted", "revoked": "bad", "expired": "bad"}
NA = "n/a"

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px 24px;color:#1b1f23;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 6px}
.sub{color:#586069;margin-bottom:8px}
table{border-collapse:collapse;background:#fff;border:1px solid #d1d5da}
th,td{padding:4px 10px;border-bottom:1px solid #e1e4e8;text-align:left;vertical-align:top}
th{background:#f1f3f5;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#22863a;font-weight:600}.warn{color:#b08800;font-weight:600}.bad{color:#cb2431;font-weight:600}
.muted{color:#6a737d}.na{color:#959da5;font-style:italic}
.cards{display:flex;gap:10px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d1d5da;padding:6px 12px;min-width:110px}
.card b{display:block;font-size:20px}
.detail{max-width:520px;word-break:break-all;font-family:ui-monospace,monospace;font-size:12px}
.grid{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
"""


def _e(value: object) -> str:
    """Escape for HTML text and attribute values (also used inside SVG)."""
    return html.escape(str(value), quote=True)


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    stamp = dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({_ago(now - ts)})"


def _ago(seconds: float) -> str:
    future = seconds < 0
    s = abs(seconds)
    text = f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}min" if s < 7200 else f"{s / 3600:.0f}h" if s < 172800 else f"{s / 86400:.0f}d"
    return f"in {text}" if future else f"{text} ago"


def _num(value: float | int | None, fmt: str = "{:g}") -> str:
    if value is None:
        return f'<span class="na">{NA}</span>'
    return _e(fmt.format(value))


def _expiry(ts: float | None, now: float) -> str:
    if ts is None:
        return f'<span class="na">{NA}</span>'
    days = (ts - now) / 86400
    cls = "bad" if days < 0 else "warn" if days < 30 else ""
    stamp = dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")
    label = "expired" if days < 0 else f"{days:.0f} d"
    return f'<span class="{cls}">{_e(stamp)} ({_e(label)})</span>'


def _agent_rows(rows: Iterable[AgentRow], now: float, colors: dict[str, str]) -> str:
    out = []
    for row in rows:
        v = row.view
        swatch = colors.get(v.agent_id)
        dot = f'<span style="color:{swatch}">&#9632;</span> ' if swatch else ""
        out.append(
            "<tr>"
            f"<td>{dot}{_e(v.agent_id)}</td>"
            f'<td class="{STATE_CLASS.get(v.status, "")}">{_e(v.status)}</td>'
            f"<td>{_e(_when(v.last_seen, now))}</td>"
            f'<td class="n">{_num(round(row.readings_per_min, 2))}</td>'
            f'<td class="n">{_num(v.readings)}</td>'
            f'<td class="n">{_num(v.outbox_backlog)}</td>'
            f'<td class="n">{_num(row.gaps)}</td>'
            f'<td class="n">{_num(row.dropped)}</td>'
            f"<td>{_expiry(v.cert_not_after, now)}</td>"
            f"<td>{_e(v.version or '')}</td>"
            "</tr>"
        )
    if not out:
        return '<tr><td colspan="10" class="muted">no agents enrolled: edge-coordinator enroll CSR (or --bundle NAME)</td></tr>'
    return "\n".join(out)


def plot_svg(snap: FleetSnapshot, colors: dict[str, str], width: int = 760, height: int = 200) -> str:
    """Readings per agent per bucket as polylines, with axes and a legend; no script."""
    left, right, top, bottom = 44, 150, 10, 28
    pw, ph = width - left - right, height - top - bottom
    n = max((len(v) for v in snap.series.values()), default=0)
    peak = max((max(v) for v in snap.series.values() if v), default=0)
    ymax = max(4, -(-peak // 4) * 4)  # a multiple of 4: integer tick labels
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="readings per agent over time" style="background:#fff;border:1px solid #d1d5da">']
    for i in range(5):  # horizontal grid and y labels
        y = top + ph - ph * i / 4
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eaecef"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#586069">'
                     f'{_e(ymax * i // 4)}</text>')
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#959da5"/>')
    for frac in (0.0, 0.5, 1.0):  # x labels: minutes before now
        x = left + pw * frac
        seconds = (1 - frac) * (snap.now - snap.plot_start)
        label = "now" if frac == 1.0 else f"-{seconds / 60:.0f} min" if seconds >= 120 else f"-{seconds:.0f} s"
        parts.append(f'<text x="{x:.1f}" y="{height - 8}" font-size="11" text-anchor="middle" fill="#586069">{_e(label)}</text>')
    if n == 0:
        parts.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph / 2:.1f}" font-size="13" text-anchor="middle" '
                     f'fill="#6a737d">no readings in the last {(snap.now - snap.plot_start) / 60:.0f} min</text>')
    for k, (agent, values) in enumerate(sorted(snap.series.items())):
        color = colors.get(agent, PALETTE[k % len(PALETTE)])
        step = pw / max(1, n - 1)
        points = " ".join(f"{left + i * step:.1f},{top + ph - ph * v / ymax:.1f}" for i, v in enumerate(values))
        dash = ' stroke-dasharray="6 3"' if k % 2 else ""  # lines that coincide stay visible
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" stroke-opacity="0.85"{dash} points="{points}">'
                     f'<title>{_e(agent)}</title></polyline>')
        ly = top + 14 + 18 * k
        parts.append(f'<rect x="{left + pw + 12}" y="{ly - 9}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{left + pw + 28}" y="{ly}" font-size="12" fill="#24292e">{_e(agent[:18])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _refusal_tables(snap: FleetSnapshot) -> str:
    counts = "".join(f'<tr><td>{_e(reason)}</td><td class="n">{_e(n)}</td></tr>'
                     for reason, n in sorted(snap.refusals.items(), key=lambda kv: (-kv[1], kv[0])))
    if not counts:
        counts = '<tr><td colspan="2" class="muted">no refused messages in the quarantine</td></tr>'
    recent = "".join(
        "<tr>"
        f"<td>{_e(_when(m.received_at, snap.now))}</td><td>{_e(m.reason)}</td>"
        f"<td>{_e(m.signer or '-')}</td><td>{_e(m.task_name or '-')}</td>"
        f'<td class="detail">{_e(m.detail[:300])}</td>'
        "</tr>"
        for m in snap.recent_refusals
    )
    if not recent:
        recent = '<tr><td colspan="5" class="muted">none</td></tr>'
    return (
        '<div class="grid"><table><tr><th>reason</th><th>refused</th></tr>' + counts + "</table>"
        '<table><tr><th>when</th><th>reason</th><th>signer</th><th>task</th><th>detail</th></tr>'
        + recent + "</table></div>"
    )


def _health(snap: FleetSnapshot) -> str:
    if not snap.health:
        return ""
    rows = "".join(
        f'<tr><td>{_e(name)}</td><td class="{"ok" if r.ok else "bad"}">{"ok" if r.ok else "FAILING"}</td>'
        f"<td>{_e(r.detail)}</td><td>{_e(r.fix)}</td></tr>"
        for name, r in snap.health.items()
    )
    return "<h2>Health</h2><table><tr><th>check</th><th>state</th><th>detail</th><th>fix</th></tr>" + rows + "</table>"


def _checkpoint(snap: FleetSnapshot) -> str:
    if not snap.checkpoint:
        return f'<p><span class="na">{NA}</span> <span class="muted">(no transparency-log checkpoint yet)</span></p>'
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in snap.checkpoint.items())
    return f"<table>{rows}</table>"


def render(snap: FleetSnapshot) -> str:
    """The whole page as a string; every dynamic value escaped."""
    colors = {agent: PALETTE[k % len(PALETTE)] for k, agent in enumerate(sorted(snap.series))}
    states: dict[str, int] = {}
    for row in snap.agents:
        states[row.view.status] = states.get(row.view.status, 0) + 1
    healthy = all(r.ok for r in snap.health.values()) if snap.health else None
    lag = "all anchored" if snap.anchor_lag is None else f"{snap.anchor_lag:.0f}s"
    lag_cls = "" if snap.anchor_lag is None or snap.anchor_lag <= snap.anchor_lag_max else "bad"
    state_text = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
    health_card = ("" if healthy is None else
                   f'<div class="card">health<b class="{"ok" if healthy else "bad"}">{"ok" if healthy else "FAILING"}</b></div>')
    updated = dt.datetime.fromtimestamp(snap.now, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{int(snap.refresh_seconds)}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>edgeledger fleet</title><style>{CSS}</style></head>
<body>
<h1>edgeledger fleet</h1>
<div class="sub">updated {_e(updated)}; refreshes every {int(snap.refresh_seconds)} s &middot;
<a href="/metrics">/metrics</a> &middot; <a href="/healthz">/healthz</a></div>
<div class="cards">
{health_card}
<div class="card">agents<b>{len(snap.agents)}</b>{_e(state_text)}</div>
<div class="card">ingested<b>{_e(f"{snap.ingest_per_min:.1f}")}/min</b>journal rows, last 5 min</div>
<div class="card">anchored<b>{_e(f"{snap.anchor_per_min:.1f}")}/min</b>rows confirmed, last 5 min</div>
<div class="card">anchoring lag<b class="{lag_cls}">{_e(lag)}</b>pending {_e(snap.pending.get("pending", 0))}, sent {_e(snap.pending.get("sent", 0))}</div>
<div class="card">refused<b>{_e(sum(snap.refusals.values()))}</b>messages in quarantine</div>
</div>
<h2>Agents</h2>
<table>
<tr><th>agent</th><th>state</th><th>last seen</th><th>readings/min</th><th>readings</th><th>backlog</th><th>gaps</th><th>dropped</th><th>certificate expires</th><th>version</th></tr>
{_agent_rows(snap.agents, snap.now, colors)}
</table>
<h2>Readings per agent (per {_e(f"{snap.plot_step:g}")} s)</h2>
{plot_svg(snap, colors)}
<h2>Refused messages by reason</h2>
{_refusal_tables(snap)}
<h2>Latest checkpoint / audit</h2>
{_checkpoint(snap)}
{_health(snap)}
</body></html>
"""
