"""A real `edge-coordinator run` with simulated agents: /metrics series, /healthz, the fleet page in Chromium.

One daemon for the module (starting one costs a broker, a chain and a contract deploy);
the tests only read from it, except the journal-lock test, which restores what it takes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from security.quarantine import Quarantine
from tests.support.files import immutable
from tests.support.prom import sample

from .support import CoordinatorProcess, cli, simagent, wait_until

pytestmark = pytest.mark.slow

AGENTS = ("ops-a", "ops-b")
EVIL_AGENT = 'ops<i>&"x'  # enrolled when enrolment allows the name: it reaches the page as a CN
EVIL_DETAIL = '<script>document.title="pwned"</script>'
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Set to a path (e.g. docs/fleet-page.png) to keep the fleet page screenshot.
SCREENSHOT_ENV = "EDGELEDGER_FLEET_SCREENSHOT"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    proc = CoordinatorProcess(tmp_path_factory.mktemp("ops") / "coord")
    try:
        proc.init(*AGENTS)
        evil_enrolled = cli("enroll", "--data-dir", str(proc.data_dir), "--bundle", EVIL_AGENT).returncode == 0
        proc.start()
        pubs = [simagent(proc.bundle(n), "--count", "30", "--interval", "0.25", "--heartbeat-every", "10")
                for n in AGENTS]
        for pub in pubs:
            out, err = pub.communicate(timeout=180)
            assert pub.returncode == 0, err[-2000:]
        wait_until(lambda: proc.readings() == 60, 120, "60 readings stored")
        wait_until(proc.all_confirmed, 120, "every journal row confirmed on chain")
        yield proc, evil_enrolled
    finally:
        proc.cleanup()


def _get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _health(proc: CoordinatorProcess) -> tuple[int, dict]:
    status, body, _ = _get(f"http://127.0.0.1:{proc.http_port}/healthz")
    return status, json.loads(body)


def test_metrics_series_of_a_running_coordinator(daemon) -> None:
    proc, _ = daemon
    status, _, headers = _get(f"http://127.0.0.1:{proc.http_port}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = wait_until(lambda: (t := proc.metrics()) and (sample(t, "edgeledger_anchor_latency_seconds_count") or 0) >= 66
                      and t, 30, "66 anchored rows observed in the anchor latency histogram")
    assert sample(text, "edgeledger_anchor_latency_seconds_count") == 66
    assert sample(text, "edgeledger_tasks_executed_total", task="edge.ingest") == 60
    assert sample(text, "edgeledger_tasks_executed_total", task="edge.heartbeat") == 6
    assert sample(text, "edgeledger_tasks_executed_total", task="edge.command_result") == 0  # present from start
    assert sample(text, "edgeledger_ingest_latency_seconds_count", task="edge.ingest") == 60
    assert sample(text, "edgeledger_tasks_refused_total", reason="duplicate_seq") == 0
    assert sample(text, "edgeledger_signing_refusals_total", reason="cert_revoked") == 0
    assert sample(text, "edgeledger_signing_accepted_total", kind="task") >= 66
    assert sample(text, "edgeledger_ledger_pending_rows", state="pending") == 0
    assert sample(text, "edgeledger_ledger_anchor_lag_seconds") == 0
    now = time.time()
    for agent in AGENTS:
        assert sample(text, "edgeledger_agent_readings_total", agent=agent) == 30
        assert sample(text, "edgeledger_agent_outbox_backlog", agent=agent) == 0
        assert sample(text, "edgeledger_agent_state", agent=agent, state="online") == 1
        assert now - 600 < sample(text, "edgeledger_agent_last_seen_timestamp_seconds", agent=agent) <= now
        issued = sample(text, "edgeledger_agent_certificate_expiry_timestamp_seconds", agent=agent, source="issued")
        presented = sample(text, "edgeledger_agent_certificate_expiry_timestamp_seconds", agent=agent, source="presented")
        assert issued == presented and issued > now
    assert sample(text, "edgeledger_child_up", child="mosquitto") == 1
    assert sample(text, "edgeledger_child_up", child="anvil") == 1
    assert "edgeledger_build_info{version=" in text
    assert sample(text, "process_resident_memory_bytes") > 0


def test_healthz_names_an_unwritable_journal_and_recovers(daemon) -> None:
    proc, _ = daemon
    status, body = _health(proc)
    assert status == 200 and body["ok"], body
    assert set(body["checks"]) == {"broker", "chain", "journal", "anchoring", "writer", "worker"}
    assert all(c["ok"] for c in body["checks"].values())
    journal = proc.data_dir / "journal.db"
    # Root ignores file modes: first the journal's write lock is taken, as a stuck writer
    # (an open sqlite3 shell, a hung backup) would.
    blocker = sqlite3.connect(journal, isolation_level=None, timeout=30)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        status, body = _health(proc)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert status == 503 and body["ok"] is False
    failed = body["checks"]["journal"]
    assert failed["ok"] is False and str(journal) in failed["detail"] and "not writable" in failed["detail"]
    assert "write lock" in failed["fix"]
    assert body["checks"]["broker"]["ok"] and body["checks"]["chain"]["ok"]
    status, body = wait_until(lambda: (r := _health(proc))[0] == 200 and r, 30, "/healthz back to 200")
    assert body["checks"]["journal"]["ok"]
    # and truly unwritable, where the file system lets even root be refused: an immutable WAL file
    with immutable(Path(f"{journal}-wal")) as applied:
        status, body = _health(proc) if applied else (None, None)
    if applied:
        assert status == 503 and body["checks"]["journal"]["ok"] is False
        assert str(journal) in body["checks"]["journal"]["detail"] and "readonly" in body["checks"]["journal"]["detail"]
        wait_until(lambda: _health(proc)[0] == 200, 30, "/healthz back to 200 after the WAL file is writable again")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
def test_fleet_page_in_headless_chromium(daemon, tmp_path: Path) -> None:
    proc, evil_enrolled = daemon
    Quarantine(proc.data_dir / "quarantine.sqlite").add(
        "bad_signature", EVIL_DETAIL, b"raw", signer=EVIL_AGENT, task_name="edge.ingest")
    url = f"http://127.0.0.1:{proc.http_port}/"
    status, body, headers = _get(url)
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src" not in headers["Content-Security-Policy"] and "default-src 'none'" in headers[
        "Content-Security-Policy"]
    assert _get(f"http://127.0.0.1:{proc.http_port}/fleet")[0] == 200

    dom = _chromium(tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "<title>edgeledger fleet</title>" in page  # the quarantined script did not run
    assert "&lt;script&gt;document.title=\"pwned\"&lt;/script&gt;" in page and "<script" not in page
    for agent in AGENTS:
        assert f"{agent}</td>" in page
    assert page.count(">online</td>") >= 2 and "<polyline" in page
    assert "bad_signature" in page and "n/a" in page
    assert "ops&lt;i&gt;&amp;\"x" in page and "<i>" not in page  # the quarantine row's signer CN
    if evil_enrolled:  # and, where enrolment accepts such a name, the agents table
        assert "ops&lt;i&gt;&amp;\"x</td>" in page

    shot = tmp_path / "fleet-page.png"
    taken = _chromium(tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,900", url)
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    assert _png_size(shot) == (1280, 900) and shot.stat().st_size > 20_000  # a rendered page, not a blank one
    keep = os.environ.get(SCREENSHOT_ENV)
    if keep:
        shutil.copyfile(shot, keep)
