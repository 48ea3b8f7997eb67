"""The coordinator's metrics registry and /healthz checks, on a real temporary journal (no daemon)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator import health
from coordinator.cli import main
from coordinator.config import load_config
from coordinator.fleet_pki import FleetStore
from coordinator.fleet_view import latest_issued
from coordinator.ingest import ensure_schema
from coordinator.metrics import (
    EXECUTION_REFUSALS,
    TASKS,
    AnchorLatencyFeed,
    Metrics,
    agent_families,
    ledger_families,
    standard_metrics,
)
from coordinator.registry import list_agents, touch
from ledger.journal import Journal, oldest_unanchored
from ledger.record import ExecutionRecord
from security import metrics as security_metrics
from security.metrics import REFUSAL_REASONS
from tests.support.files import immutable
from tests.support.net import free_port
from tests.support.prom import sample, samples

ROOT = Path(__file__).resolve().parents[2]


def _record(task_id: str, agent: str = "m-a") -> ExecutionRecord:
    now = time.time()
    return ExecutionRecord(task_id=task_id, task_name="edge.ingest", agent_id=agent, signer_fingerprint="",
                           args_digest="0" * 64, result_digest="0" * 64, status="SUCCESS", received_at=now,
                           started_at=now, finished_at=now, envelope_digest="0" * 64)


def _anchor_first(journal: Journal, size: int, block: int) -> None:
    """Confirm the first `size` rows as the chain writer does: a checkpoint covering them, anchored."""
    assert journal.add_checkpoint(size, bytes(32), f"checkpoint {size}")
    journal.checkpoints_confirmed([(size, block, f"0x{block:02x}", "0x7a")], 31337, "0xC0")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "d"
    assert main(["init", "--data-dir", str(data), "--broker-port", str(free_port())]) == 0
    for name in ("m-a", "m-b"):
        assert main(["enroll", "--data-dir", str(data), "--bundle", name]) == 0
    return data


def test_every_documented_series_is_present_before_its_first_event() -> None:
    text = standard_metrics().render().decode()
    values = samples(text)
    for task in TASKS:
        for name in ("edgeledger_tasks_received_total", "edgeledger_tasks_executed_total",
                     "edgeledger_tasks_duplicate_total", "edgeledger_ingest_latency_seconds_count"):
            assert values[(name, (("task", task),))] == 0, (name, task)
    for reason in EXECUTION_REFUSALS:
        assert sample(text, "edgeledger_tasks_refused_total", reason=reason) == 0
    for reason in REFUSAL_REASONS:  # process-wide counters: present, whatever earlier tests counted
        assert sample(text, "edgeledger_signing_refusals_total", reason=reason) is not None, reason
    assert sample(text, "edgeledger_signing_accepted_total", kind="task") is not None
    assert sample(text, "edgeledger_anchor_latency_seconds_count") == 0
    assert sample(text, "edgeledger_build_info", version=Metrics().build_info._value["version"]) == 1  # type: ignore[attr-defined]
    assert sample(text, "process_resident_memory_bytes") > 0
    # one prefix: every series is ours, except the process collector's standard process_* names
    names = {name for name, _ in values}
    assert names and all(n.startswith(("edgeledger_", "process_")) for n in names), sorted(names)
    assert not any(n.endswith("_created") for n in names)


def test_histograms_measure_latencies_with_buckets() -> None:
    m = standard_metrics()
    m.observe("edgeledger_ingest_latency_seconds", 0.004, task="edge.ingest")
    m.observe("edgeledger_ingest_latency_seconds", 0.2, task="edge.ingest")
    text = m.render().decode()
    assert "# TYPE edgeledger_ingest_latency_seconds histogram" in text
    assert sample(text, "edgeledger_ingest_latency_seconds_bucket", task="edge.ingest", le="0.005") == 1
    assert sample(text, "edgeledger_ingest_latency_seconds_bucket", task="edge.ingest", le="0.25") == 2
    assert sample(text, "edgeledger_ingest_latency_seconds_count", task="edge.ingest") == 2
    assert sample(text, "edgeledger_ingest_latency_seconds_sum", task="edge.ingest") == pytest.approx(0.204)


def test_each_metrics_object_has_its_own_registry() -> None:
    one, two = standard_metrics(), standard_metrics()  # would raise "Duplicated timeseries" on a shared registry
    one.inc("edgeledger_tasks_received_total", task="edge.ingest")
    assert one.get("edgeledger_tasks_received_total", task="edge.ingest") == 1
    assert two.get("edgeledger_tasks_received_total", task="edge.ingest") == 0
    with pytest.raises(KeyError, match="unknown metric"):
        one.inc("edge_tasks_received_total", task="edge.ingest")


def test_security_counters_keep_their_call_sites_and_escape_labels() -> None:
    before = security_metrics.REFUSALS.get("cert_revoked")
    security_metrics.REFUSALS.inc("cert_revoked")
    security_metrics.REFUSALS.inc('odd"label\\')
    text = standard_metrics().render().decode()
    assert sample(text, "edgeledger_signing_refusals_total", reason="cert_revoked") == before + 1
    assert sample(text, "edgeledger_signing_refusals_total", reason='odd"label\\') >= 1
    assert 'reason="odd\\"label\\\\"' in text


def test_anchor_latency_comes_from_rows_confirmed_after_start_and_lag_from_the_oldest_pending(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    journal.append(_record("before"))
    _anchor_first(journal, 1, 1)  # "before" anchored before the coordinator started: not observed
    m = standard_metrics()
    feed = AnchorLatencyFeed(journal.path, m.anchor_latency)
    m.before_scrape(feed)
    for i in range(3):
        journal.append(_record(f"t{i}"))
    _anchor_first(journal, 3, 2)  # t0, t1
    text = m.render().decode()
    assert sample(text, "edgeledger_anchor_latency_seconds_count") == 2
    assert sample(m.render().decode(), "edgeledger_anchor_latency_seconds_count") == 2  # not counted twice
    _anchor_first(journal, 4, 3)  # t2
    assert sample(m.render().decode(), "edgeledger_anchor_latency_seconds_count") == 3

    journal.append(_record("late"))
    with journal.transaction() as db:
        db.conn.execute("UPDATE executions SET appended_at = appended_at - 500 WHERE task_id = 'late'")
    fams = {f.name: f for f in ledger_families(journal.path)}
    lag = fams["edgeledger_ledger_anchor_lag_seconds"].samples[0].value
    assert 500 <= lag < 600
    pending = {s.labels["state"]: s.value for s in fams["edgeledger_ledger_pending_rows"].samples}
    assert pending == {"pending": 1, "sent": 0}
    journal.close()


def test_per_agent_series_from_registry_and_issued_certificates(data_dir: Path) -> None:
    cfg = load_config(data_dir=data_dir, require_file=True)
    store = FleetStore(cfg)
    journal = Journal(cfg.journal_path)
    with journal.transaction() as db:
        ensure_schema(db)
        touch(db, "m-a", task="edge.heartbeat", cert_not_after=2e9, heartbeat={"outbox_backlog": 7})
        touch(db, "m-a", task="edge.ingest", readings=1, seq=1)
        touch(db, "m-old", task="edge.ingest", readings=3, seq=3, now=time.time() - 10 * cfg.stale_after)
        touch(db, "m-exp", task="edge.ingest", cert_not_after=time.time() - 60)  # signed with a now-expired cert
    all_samples = [s for f in agent_families(list_agents(store, cfg.journal_path), latest_issued(store))
                   for s in f.samples]
    journal.close()

    def value(name: str, **labels: str) -> float | None:
        assert any(s.name == name for s in all_samples), f"no series {name}"
        found = [s.value for s in all_samples if s.name == name and s.labels == labels]
        return found[0] if found else None

    assert value("edgeledger_agent_outbox_backlog", agent="m-a") == 7
    assert value("edgeledger_agent_readings_total", agent="m-a") == 1
    assert value("edgeledger_agent_readings_total", agent="m-b") == 0  # enrolled, never seen: still a series
    assert value("edgeledger_agent_state", agent="m-a", state="online") == 1
    assert value("edgeledger_agent_state", agent="m-b", state="never-seen") == 1
    assert value("edgeledger_agent_state", agent="m-old", state="stale") == 1
    assert value("edgeledger_agent_state", agent="m-exp", state="expired") == 1
    assert value("edgeledger_agent_state", agent="m-exp", state="online") == 0
    assert value("edgeledger_agent_last_seen_timestamp_seconds", agent="m-b") is None
    assert value("edgeledger_agent_certificate_expiry_timestamp_seconds", agent="m-a", source="presented") == 2e9
    issued = value("edgeledger_agent_certificate_expiry_timestamp_seconds", agent="m-b", source="issued")
    assert issued == store.latest("m-b").not_after > time.time()
    assert value("edgeledger_agents", state="online") == 1 and value("edgeledger_agents", state="revoked") == 0
    assert not any(s.labels.get("agent") in ("coordinator", "broker") for s in all_samples)


def test_online_is_judged_against_the_configured_heartbeat_interval(data_dir: Path) -> None:
    cfg = load_config(data_dir=data_dir, require_file=True,
                      env={"EDGE_COORDINATOR_MONITOR_HEARTBEAT_INTERVAL": "1000"})
    assert cfg.stale_after == 2000
    journal = Journal(cfg.journal_path)
    with journal.transaction() as db:
        ensure_schema(db)
        touch(db, "m-a", task="edge.heartbeat", now=time.time() - 1500)  # > the old hard-coded 120 s
    journal.close()
    views = {v.agent_id: v.status for v in list_agents(FleetStore(cfg), cfg.journal_path)}
    assert views["m-a"] == "online"
    short = load_config(data_dir=data_dir, require_file=True, env={"EDGE_COORDINATOR_MONITOR_HEARTBEAT_INTERVAL": "60"})
    assert {v.agent_id: v.status for v in list_agents(FleetStore(short), short.journal_path)}["m-a"] == "stale"


def test_journal_check_writes_a_probe_row_and_names_the_journal_when_it_cannot(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    check = health.journal_check(journal.path, timeout=0.2)
    assert check().ok
    with sqlite3.connect(journal.path) as conn:
        assert conn.execute(f"SELECT COUNT(*) FROM {health.PROBE_TABLE}").fetchone() == (1,)
    blocker = sqlite3.connect(journal.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the next commit would wait
    try:
        failed = check()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert not failed.ok and str(journal.path) in failed.detail and "write lock" in failed.fix
    assert check().ok
    with immutable(Path(f"{journal.path}-wal")) as applied:  # a WAL file nobody may write, root included
        readonly = check() if applied else None
    if applied:
        assert not readonly.ok and "readonly" in readonly.detail and str(journal.path) in readonly.detail
    assert check().ok
    missing = health.journal_check(tmp_path / "nope.db", timeout=0.2)()
    assert not missing.ok and "does not exist" in missing.detail and not (tmp_path / "nope.db").exists()
    journal.close()


def test_anchoring_check_fails_over_the_threshold_and_report_is_503(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    check = health.anchoring_check(journal.path, 60.0, oldest_unanchored)
    assert check().ok
    journal.append(_record("x"))
    assert check().ok
    with journal.transaction() as db:
        db.conn.execute("UPDATE executions SET appended_at = appended_at - 120")
    result = check()
    assert not result.ok and "limit 60s" in result.detail and "monitor.anchor_lag_max" in result.fix
    status, body = health.report(health.run_checks({"anchoring": check, "broken": lambda: 1 / 0}))
    assert status == 503 and body["ok"] is False
    assert body["checks"]["broken"]["ok"] is False and "ZeroDivisionError" in body["checks"]["broken"]["detail"]
    journal.close()


def test_the_agent_never_imports_prometheus_client() -> None:
    code = ("import sys, agent.cli, agent.app, agent.runtime, security.signing_setup; "
            "print('prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_http_routes_extend_by_path_and_prefix_and_fail_soft() -> None:
    import urllib.error
    import urllib.request

    from coordinator.http import Response, StatusServer

    def boom(_req: object) -> Response:
        raise RuntimeError("handler bug")

    server = StatusServer("127.0.0.1", 0, standard_metrics(), lambda: (200, {"ok": True, "checks": {}}))
    server.route("/tlog/", lambda req: Response(200, f"tlog {req.path} {req.query.get('n')}".encode()))
    server.route("/boom", boom)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with urllib.request.urlopen(base + "/tlog/checkpoint?n=3", timeout=10) as resp:
            assert resp.read() == b"tlog /tlog/checkpoint ['3']"
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        for path, code, words in (("/nope", 404, b"/healthz, /metrics, /tlog/..."), ("/boom", 500, b"coordinator log")):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=10)
            assert err.value.code == code and words in err.value.read()
    finally:
        server.stop()


def test_broker_and_chain_checks_name_the_unreachable_endpoint() -> None:
    port = free_port()  # nothing listens there
    broker = health.broker_check(f"mqtts://127.0.0.1:{port}", None)()
    assert not broker.ok and f"127.0.0.1:{port}" in broker.detail and "broker.url" in broker.fix
    chain = health.chain_check(f"http://127.0.0.1:{port}", None)()
    assert not chain.ok and "eth_blockNumber" in chain.detail and "chain.url" in chain.fix
    dead = health.chain_check(f"http://127.0.0.1:{port}", lambda: False)()
    assert not dead.ok and "managed anvil is not running" in dead.detail
