"""Managed Mosquitto (mutual TLS, CRL reload on SIGHUP, adoption after a crash) and /metrics."""

from __future__ import annotations

import json
import signal
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.broker import managed_broker
from coordinator.cli import main
from coordinator.config import load_config
from coordinator.fleet_pki import FleetStore
from coordinator.health import CheckResult, report
from coordinator.http import StatusServer
from coordinator.metrics import agent_families, standard_metrics
from coordinator.registry import AgentView
from tests.support.net import free_port
from tests.support.prom import sample


def connects(bundle: Path, name: str, port: int) -> bool:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=f"{name}-{time.monotonic_ns()}")
    client.tls_set(ca_certs=str(bundle / "ca.pem"), certfile=str(bundle / f"{name}.pem"), keyfile=str(bundle / f"{name}.key"),
                   tls_version=ssl.PROTOCOL_TLS_CLIENT)
    try:
        client.connect("127.0.0.1", port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not client.is_connected():
            if client.loop(0.2) != mqtt.MQTT_ERR_SUCCESS:
                return False  # the broker closed the connection: refused
        return client.is_connected()
    except (ssl.SSLError, OSError):
        return False
    finally:
        client.disconnect()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "d"
    assert main(["init", "--data-dir", str(data), "--broker-port", str(free_port())]) == 0
    for name in ("sup-a", "sup-b"):
        assert main(["enroll", "--data-dir", str(data), "--bundle", name]) == 0
    return data


def test_managed_broker_enforces_tls_and_reloads_crl(data_dir: Path) -> None:
    cfg = load_config(data_dir=data_dir, require_file=True)
    store = FleetStore(cfg)
    broker = managed_broker(cfg, store).start()
    try:
        a, b = data_dir / "bundles" / "sup-a", data_dir / "bundles" / "sup-b"
        assert connects(a, "sup-a", cfg.broker.port)
        store.revoke("sup-a")
        broker.signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and connects(a, "sup-a", cfg.broker.port):
            time.sleep(0.2)
        assert not connects(a, "sup-a", cfg.broker.port)
        assert connects(b, "sup-b", cfg.broker.port)
    finally:
        broker.stop()
    assert not broker.alive()


def test_broker_left_by_a_killed_coordinator_is_adopted(data_dir: Path) -> None:
    cfg = load_config(data_dir=data_dir, require_file=True)
    store = FleetStore(cfg)
    first = managed_broker(cfg, store).start()
    try:
        pid = first.pid
        first.process = None  # the owner "dies" without stopping its child
        second = managed_broker(cfg, store).start()
        assert second.pid == pid and second.alive()
        second.stop()
        assert not second.alive()
    finally:
        first.stop()


def test_status_server_metrics_and_health() -> None:
    metrics = standard_metrics()
    metrics.inc("edgeledger_tasks_received_total", task="edge.ingest")
    metrics.inc("edgeledger_tasks_refused_total", reason="identity_mismatch")
    metrics.observe("edgeledger_anchor_latency_seconds", 0.25)
    metrics.add_families("agents", lambda: agent_families(
        [AgentView("a1", "online", 123.0, None, 0, 5, None)], []))
    healthy = {"broker": CheckResult(True, "reachable"), "chain": CheckResult(True, "reachable")}
    server = StatusServer("127.0.0.1", 0, metrics, lambda: report(dict(healthy))).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert sample(text, "edgeledger_tasks_received_total", task="edge.ingest") == 1
        assert sample(text, "edgeledger_tasks_refused_total", reason="identity_mismatch") == 1
        assert sample(text, "edgeledger_agent_last_seen_timestamp_seconds", agent="a1") == 123
        assert "# TYPE edgeledger_anchor_latency_seconds histogram" in text
        assert sample(text, "edgeledger_anchor_latency_seconds_bucket", le="0.5") == 1
        ok = json.loads(urllib.request.urlopen(base + "/healthz", timeout=10).read())
        assert ok == {"ok": True, "checks": {"broker": {"ok": True, "detail": "reachable"},
                                             "chain": {"ok": True, "detail": "reachable"}}}
        healthy["chain"] = CheckResult(False, "chain unreachable", "start it")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/healthz", timeout=10)
        assert err.value.code == 503
        assert json.loads(err.value.read())["checks"]["chain"] == {"ok": False, "detail": "chain unreachable",
                                                                   "fix": "start it"}
    finally:
        server.stop()
