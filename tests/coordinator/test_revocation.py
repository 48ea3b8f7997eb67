"""Revocation end to end: real `edge-coordinator` (dynsec default), real `edge-agent` processes.

A revoked agent is cut at once, learns it is revoked, stops (exit 78) and refuses to
start; the other agents get the new CRL pushed (edge.agent.update_crl); an agent whose
CRL is past its next-update refuses coordinator commands until a fresh CRL arrives; and
no agent may subscribe to another agent's queue or the coordinator's ingest group.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from paho.mqtt.enums import CallbackAPIVersion

from agent.cli import main as agent_main
from security.pki import CertificateAuthority, load_certificate
from tests.agent.support import Proc, kill_group

from .support import ROOT, CoordinatorProcess, cli, wait_until

pytestmark = pytest.mark.slow

NOT_AUTHORIZED = 0x87


def enroll_agent(coordinator: CoordinatorProcess, name: str, home: Path) -> Path:
    assert agent_main(["--data-dir", str(home), "enroll", "--bundle", str(coordinator.bundle(name))]) == 0
    return home


def run_agent(home: Path, interval: str = "0.5") -> Proc:
    env = {"EDGE_AGENT_BACKOFF_MIN": "0.1", "EDGE_AGENT_BACKOFF_MAX": "1", "EDGE_AGENT_PUBLISH_TIMEOUT": "5",
           "EDGE_AGENT_HEARTBEAT_INTERVAL": "0"}
    proc = Proc([sys.executable, "-m", "agent", "--data-dir", str(home), "run", "--interval", interval],
                home.parent / f"{home.name}.log", env=env).start()
    proc.wait_for_output("ready in", timeout=90)
    return proc


def agent_cli(home: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "--data-dir", str(home), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def readings(coordinator: CoordinatorProcess, agent: str) -> int:
    return coordinator.query("SELECT COUNT(*) FROM readings WHERE agent_id = ?", (agent,))[0][0]


def subscribe_codes(coordinator: CoordinatorProcess, name: str, filters: list[str]) -> list[int]:
    """SUBACK reason codes a paho client with `name`'s certificate gets on the managed broker."""
    bundle = coordinator.bundle(name)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=f"probe-{time.monotonic_ns()}")
    ctx = ssl.create_default_context(cafile=str(bundle / "ca.pem"))
    ctx.load_cert_chain(str(bundle / f"{name}.pem"), str(bundle / f"{name}.key"))
    client.tls_set_context(ctx)
    codes: dict[int, list[int]] = {}
    client.on_subscribe = lambda _c, _u, mid, rcs, _p: codes.__setitem__(mid, [rc.value for rc in rcs])
    client.connect("127.0.0.1", coordinator.broker_port)
    client.loop_start()
    try:
        wait_until(client.is_connected, 15, "probe connected")
        mids = [client.subscribe(f, qos=1)[1] for f in filters]
        wait_until(lambda: all(m in codes for m in mids), 15, "SUBACKs")
        return [codes[m][0] for m in mids]
    finally:
        client.disconnect()
        client.loop_stop()


def stale_crl(coordinator: CoordinatorProcess) -> bytes:
    """A CRL genuinely signed by the fleet CA whose next-update has passed."""
    ca = CertificateAuthority.load(coordinator.data_dir / "pki")
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
           .last_update(now - dt.timedelta(days=9)).next_update(now - dt.timedelta(days=2))
           .sign(ca.key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.PEM)


def push_update_crl(coordinator: CoordinatorProcess, agent: str, crl_pem: str):
    """edge.agent.update_crl signed by the coordinator's identity; waits for the agent's result."""
    from coordinator.celery_app import make_app
    from coordinator.config import load_config

    app = make_app(load_config(data_dir=coordinator.data_dir, require_file=True), consumer=False)
    try:
        result = app.send_task("edge.agent.update_crl", kwargs={"crl_pem": crl_pem}, queue=f"agent.{agent}", retry=False)
        result.get(timeout=60, propagate=False)
        return result
    finally:
        app.close()


def test_revoked_agent_is_cut_stops_and_the_others_get_the_crl(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    coordinator.init("rv-a", "rv-b", "rv-c")
    assert "acl_mode = \"dynsec\"" in (coordinator.data_dir / "coordinator.toml").read_text()
    coordinator.start()
    homes = {n: enroll_agent(coordinator, n, tmp_path / n) for n in ("rv-a", "rv-b")}
    # rv-b samples once and then idles: only its consuming connection can notice the revocation
    procs = {"rv-a": run_agent(homes["rv-a"]), "rv-b": run_agent(homes["rv-b"], interval="3600")}
    try:
        wait_until(lambda: readings(coordinator, "rv-a") >= 3, 90, "rv-a's readings")
        wait_until(lambda: readings(coordinator, "rv-b") >= 1, 90, "rv-b's first reading")

        # no agent can join another agent's queue or the coordinator's ingest group
        assert subscribe_codes(coordinator, "rv-a", [
            "$share/edge.ingest/kombu/d/edge.ingest/edge.ingest",
            "$share/agent.rv-b/kombu/d/agent.rv-b/agent.rv-b",
            "kombu/d/agent.rv-b/agent.rv-b",
            "#",
        ]) == [NOT_AUTHORIZED] * 4

        # a CRL past its next-update: coordinator commands are refused (fail closed) ...
        (homes["rv-a"] / "crl.pem").write_bytes(stale_crl(coordinator))
        status = agent_cli(homes["rv-a"], "status", "--json")
        assert json.loads(status.stdout)["crl"]["state"] == "stale", status.stdout
        out = cli("send", "--data-dir", str(coordinator.data_dir), "rv-a", "status", "--timeout", "60", "--json")
        assert out.returncode == 3, out.stderr  # security.exit_codes.TASK_FAILED: it ran and failed on the device
        result = json.loads(out.stdout)
        assert result["status"] == "FAILURE" and "next-update passed" in result["result"], result

        # revoke rv-b: CRL, broker reload, dynsec cut, CRL pushed to the others
        b_serial = load_certificate(homes["rv-b"] / "agent.pem").serial_number
        out = cli("revoke", "--data-dir", str(coordinator.data_dir), "rv-b")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "told the broker" in out.stdout and "broker rights updated" in out.stdout, out.stdout
        # to rv-a; rv-b (pushed too, for file mode) lost its session with its dynsec client,
        # and rv-c never ran: no session for either
        assert "CRL pushed to 1 agent(s); 2 without a broker session" in out.stdout, out.stdout

        # rv-b: cut, learns it is revoked, stops with 78 and says what to do
        assert procs["rv-b"].proc is not None
        code = procs["rv-b"].proc.wait(timeout=120)
        log_b = procs["rv-b"].output()
        assert code == 78, log_b[-3000:]
        assert "revoked" in log_b and "re-enroll" in log_b
        st = json.loads(agent_cli(homes["rv-b"], "status", "--json").stdout)
        assert st["revoked"] and st["revoked"]["reason"] in ("broker", "crl")
        assert "REVOKED" in agent_cli(homes["rv-b"], "status").stdout
        again = agent_cli(homes["rv-b"], "run")
        assert again.returncode == 78 and "revoked" in again.stderr and again.stderr.count("\n") == 1, again.stderr
        assert (homes["rv-b"] / "outbox.sqlite3").exists()  # unsent readings are kept

        # rv-a: the pushed CRL replaced its stale one and lists rv-b; commands run again
        def a_crl_lists_b() -> bool:
            crl = x509.load_pem_x509_crl((homes["rv-a"] / "crl.pem").read_bytes())
            return crl.get_revoked_certificate_by_serial_number(b_serial) is not None
        wait_until(a_crl_lists_b, 60, "the new CRL installed on rv-a")
        assert json.loads(agent_cli(homes["rv-a"], "status", "--json").stdout)["crl"]["state"] == "fresh"
        out = cli("send", "--data-dir", str(coordinator.data_dir), "rv-a", "status", "--timeout", "60", "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["status"] == "SUCCESS", out.stdout + out.stderr
        # a stale CRL pushed to the agent is refused; its fresh CRL stays in place
        fresh = (homes["rv-a"] / "crl.pem").read_bytes()
        result = push_update_crl(coordinator, "rv-a", stale_crl(coordinator).decode())
        assert result.status == "FAILURE" and "next-update passed" in str(result.result), (result.status, result.result)
        assert (homes["rv-a"] / "crl.pem").read_bytes() == fresh
        before = readings(coordinator, "rv-a")
        wait_until(lambda: readings(coordinator, "rv-a") > before, 60, "rv-a still streaming")
        assert procs["rv-a"].proc is not None and procs["rv-a"].proc.poll() is None

        listing = {a["agent_id"]: a["status"] for a in json.loads(cli("agents", "--data-dir", str(coordinator.data_dir), "--json").stdout)}
        assert listing["rv-b"] == "revoked"
    finally:
        for proc in procs.values():
            if proc.proc is not None:
                kill_group(proc.proc)


def test_reserved_names_cannot_be_enrolled(tmp_path: Path) -> None:
    data = tmp_path / "d"
    env = {"EDGE_COORDINATOR_IDENTITY": "fleet-coord"}  # "coordinator" stays reserved under another identity
    assert cli("init", "--data-dir", str(data), env=env).returncode == 0
    for name in ("coordinator", "broker", "fleet-coord"):
        out = cli("enroll", "--data-dir", str(data), "--bundle", name, env=env)
        assert out.returncode == 1 and "reserved" in out.stderr, (name, out.stderr)


def test_daemon_reissues_and_pushes_the_crl_before_it_goes_stale(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    from coordinator.config import load_config, save_config

    coordinator.init("rf-a")
    cfg = load_config(data_dir=coordinator.data_dir, require_file=True)
    cfg.pki.crl_validity, cfg.pki.crl_refresh = 600.0, 3.0  # re-issue every 3 s for the test
    save_config(cfg)
    first = x509.load_pem_x509_crl((coordinator.data_dir / "pki" / "crl.pem").read_bytes())
    coordinator.start()
    home = enroll_agent(coordinator, "rf-a", tmp_path / "rf-a")
    installed = x509.load_pem_x509_crl((home / "crl.pem").read_bytes()).last_update_utc
    proc = run_agent(home)
    try:
        def agent_got_newer() -> bool:
            crl = x509.load_pem_x509_crl((home / "crl.pem").read_bytes())
            return crl.last_update_utc > installed
        wait_until(agent_got_newer, 60, "a re-issued CRL pushed to the agent")
        now = x509.load_pem_x509_crl((coordinator.data_dir / "pki" / "crl.pem").read_bytes())
        assert now.last_update_utc > first.last_update_utc
        assert now.next_update_utc - now.last_update_utc == dt.timedelta(seconds=600) + dt.timedelta(minutes=5)
        assert json.loads(agent_cli(home, "status", "--json").stdout)["crl"]["state"] == "fresh"
        assert proc.proc is not None and proc.proc.poll() is None  # the pushes did not disturb it
    finally:
        if proc.proc is not None:
            kill_group(proc.proc)


def test_file_mode_revoked_agent_learns_it_from_the_pushed_crl(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    """The unsafe file mode cannot cut the live connection; the CRL pushed over it stops an honest agent."""
    out = cli("init", "--data-dir", str(coordinator.data_dir), "--broker-port", str(coordinator.broker_port),
              "--chain-port", str(coordinator.chain_port), "--http-port", str(coordinator.http_port), "--acl-mode", "file")
    assert out.returncode == 0, out.stderr
    assert cli("enroll", "--data-dir", str(coordinator.data_dir), "--bundle", "fm-a").returncode == 0
    coordinator.start()
    assert "UNSAFE" in coordinator.log()  # the warning logged at run
    home = enroll_agent(coordinator, "fm-a", tmp_path / "fm-a")
    proc = run_agent(home, interval="3600")
    try:
        wait_until(lambda: readings(coordinator, "fm-a") >= 1, 90, "fm-a's first reading")
        out = cli("revoke", "--data-dir", str(coordinator.data_dir), "fm-a")
        assert out.returncode == 0 and "CRL pushed to 1 agent(s)" in out.stdout, out.stdout + out.stderr
        assert "acl_mode is \"file\"" in out.stderr
        assert proc.proc is not None
        assert proc.proc.wait(timeout=120) == 78, proc.output()[-3000:]
        state = json.loads(agent_cli(home, "status", "--json").stdout)["revoked"]
        assert state["reason"] == "crl", state
    finally:
        if proc.proc is not None:
            kill_group(proc.proc)
