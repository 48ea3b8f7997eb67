"""The fleet page renderer and its read model, on a real temporary journal and quarantine."""

from __future__ import annotations

import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from coordinator.cli import main
from coordinator.config import load_config
from coordinator.fleet_page import render
from coordinator.fleet_pki import FleetStore
from coordinator.fleet_view import gather
from coordinator.health import CheckResult
from coordinator.ingest import ensure_schema
from coordinator.registry import touch
from ledger.journal import Journal
from ledger.record import ExecutionRecord
from security.quarantine import Quarantine
from tests.support.net import free_port

EVIL_AGENT = '<img src=x onerror="alert(1)">&\'"'
EVIL_DETAIL = "<script>alert('quarantine')</script>"


class Elements(HTMLParser):
    """Tags and text of a document, to tell markup from escaped text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _ingest_row(journal: Journal, task_id: str, agent: str, at: float) -> None:
    journal.append(ExecutionRecord(
        task_id=task_id, task_name="edge.ingest", agent_id=agent, signer_fingerprint="", args_digest="0" * 64,
        result_digest="0" * 64, status="SUCCESS", received_at=at, started_at=at, finished_at=at,
        envelope_digest="0" * 64))


def _anchor_first(journal: Journal, size: int, block: int) -> None:
    """Confirm the first `size` rows as the chain writer does: a checkpoint covering them, anchored."""
    assert journal.add_checkpoint(size, bytes(32), f"checkpoint {size}")
    journal.checkpoints_confirmed([(size, block, f"0x{block:02x}", "0x7a")], 31337, "0xC0")


@pytest.fixture
def fleet(tmp_path: Path):
    data = tmp_path / "d"
    assert main(["init", "--data-dir", str(data), "--broker-port", str(free_port())]) == 0
    for name in ("pg-a", "pg-b", "pg-gone"):
        assert main(["enroll", "--data-dir", str(data), "--bundle", name]) == 0
    assert main(["revoke", "--data-dir", str(data), "pg-gone"]) == 0
    cfg = load_config(data_dir=data, require_file=True)
    journal = Journal(cfg.journal_path)
    now = time.time()
    with journal.transaction() as db:
        ensure_schema(db)
        touch(db, "pg-a", task="edge.heartbeat", heartbeat={"outbox_backlog": 4, "version": "1.2.3"})
        touch(db, EVIL_AGENT, task="edge.ingest", readings=2, seq=2)  # a CN as the registry saw it
    for i in range(12):
        _ingest_row(journal, f"a{i}", "pg-a", now - 30 * i)
    for i in range(3):
        _ingest_row(journal, f"e{i}", EVIL_AGENT, now - 100 * i)
    _anchor_first(journal, 6, 7)  # a0..a5 (the first rows appended)
    Quarantine(cfg.quarantine_path).add("bad_signature", EVIL_DETAIL, b"raw", signer=EVIL_AGENT, task_name="edge.ingest")
    Quarantine(cfg.quarantine_path).add("replay", "seen before", b"raw")
    yield cfg, FleetStore(cfg), now
    journal.close()


def test_snapshot_reads_agents_rates_refusals_and_plot_series(fleet) -> None:
    cfg, store, now = fleet
    snap = gather(cfg, store, now=now + 1)
    by_id = {row.view.agent_id: row for row in snap.agents}
    assert {k: r.view.status for k, r in by_id.items()} == {
        "pg-a": "online", "pg-b": "never-seen", "pg-gone": "revoked", EVIL_AGENT: "online"}
    assert by_id["pg-a"].view.outbox_backlog == 4
    assert by_id["pg-a"].readings_per_min == pytest.approx(10 * 60 / 300)  # 10 rows in the last 300 s
    assert by_id["pg-a"].gaps == 0 and by_id["pg-a"].dropped is None  # filled by the receipts work (no heartbeat yet)
    assert sum(snap.series["pg-a"]) == 12 and sum(snap.series[EVIL_AGENT]) == 3
    assert "pg-b" not in snap.series
    assert snap.refusals == {"bad_signature": 1, "replay": 1}
    assert [m.reason for m in snap.recent_refusals] == ["replay", "bad_signature"]
    assert snap.pending == {"pending": 9, "sent": 0}
    assert snap.anchor_lag is not None and snap.anchor_lag >= 0
    assert snap.checkpoint is None
    assert snap.ingest_per_min == pytest.approx(15 * 60 / 300)  # appended just now, all 15
    assert snap.anchor_per_min == pytest.approx(6 * 60 / 300)


def test_page_escapes_attacker_strings_and_shows_hooks_as_na(fleet) -> None:
    cfg, store, now = fleet
    failing = {"journal": CheckResult(False, "journal <x> not writable", "free disk space & retry")}
    page = render(gather(cfg, store, health=failing, now=now + 1))
    parsed = Elements()
    parsed.feed(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags
    text = "".join(parsed.text)
    assert EVIL_AGENT in text and EVIL_DETAIL in text  # shown, as text
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;&#x27;&quot;" in page
    assert "&lt;script&gt;alert(&#x27;quarantine&#x27;)&lt;/script&gt;" in page
    assert "<polyline" in page and page.count("<polyline") == 2  # pg-a and the evil agent
    assert '<meta http-equiv="refresh" content="10">' in page
    assert "journal &lt;x&gt; not writable" in page and "FAILING" in page
    for state in ("online", "never-seen", "revoked"):
        assert f">{state}</td>" in page
    assert page.count('<span class="na">n/a</span>') >= 2 * 4 + 1  # gaps + dropped per agent, checkpoint


def test_page_renders_checkpoint_from_the_hook_and_an_empty_fleet(tmp_path: Path) -> None:
    data = tmp_path / "empty"
    assert main(["init", "--data-dir", str(data), "--broker-port", str(free_port())]) == 0
    cfg = load_config(data_dir=data, require_file=True)
    page = render(gather(cfg, FleetStore(cfg), checkpoint=lambda: {"tree size": "42", "root": "<ab>"}))
    assert "no agents enrolled" in page and "no readings in the last 30 min" in page
    assert "<th>tree size</th><td>42</td>" in page and "&lt;ab&gt;" in page
    assert not cfg.journal_path.exists() and not cfg.quarantine_path.exists()  # the page never creates files
