"""`broker.acl_mode = "dynsec"`: enroll adds rights to the running broker, revoke cuts a live connection."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from .support import CoordinatorProcess, cli, simagent, wait_until

pytestmark = pytest.mark.slow


def test_dynsec_enroll_at_runtime_and_revoke_cuts_live_connection(coordinator: CoordinatorProcess) -> None:
    out = cli("init", "--data-dir", str(coordinator.data_dir), "--broker-port", str(coordinator.broker_port),
              "--chain-port", str(coordinator.chain_port), "--http-port", str(coordinator.http_port), "--acl-mode", "dynsec")
    assert out.returncode == 0, out.stderr
    assert cli("enroll", "--data-dir", str(coordinator.data_dir), "--bundle", "dyn-a").returncode == 0
    coordinator.start()
    # enrolled while the broker runs: its rights are added at once
    out = cli("enroll", "--data-dir", str(coordinator.data_dir), "--bundle", "dyn-b")
    assert out.returncode == 0 and "broker rights updated" in out.stdout, out.stdout + out.stderr
    pub = simagent(coordinator.bundle("dyn-b"), "--count", "5")
    out_b, err_b = pub.communicate(timeout=120)
    assert pub.returncode == 0, err_b[-1500:]
    wait_until(lambda: coordinator.query("SELECT COUNT(*) FROM readings WHERE agent_id = 'dyn-b'") == [(5,)], 60,
               "dyn-b's readings")

    live = simagent(coordinator.bundle("dyn-a"), "--count", "0", "--duration", "60", "--interval", "0.05",
                    "--retries", "1", "--reconnect-timeout", "3")
    wait_until(lambda: coordinator.query("SELECT COUNT(*) FROM readings WHERE agent_id = 'dyn-a'") >= [(5,)], 60,
               "dyn-a streaming")
    assert live.poll() is None, "the publisher stopped before the revocation"
    out = cli("revoke", "--data-dir", str(coordinator.data_dir), "dyn-a")
    assert out.returncode == 0 and "broker rights updated" in out.stdout, out.stdout + out.stderr
    # the live connection is cut: the publisher fails long before its 60 s are up
    started = time.monotonic()
    try:
        live.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        live.kill()
        live.communicate()
        pytest.fail("the revoked agent kept publishing over its live connection")
    assert live.returncode != 0
    assert time.monotonic() - started < 45
    stored = coordinator.query("SELECT COUNT(*) FROM readings WHERE agent_id = 'dyn-a'")
    time.sleep(1.0)
    assert coordinator.query("SELECT COUNT(*) FROM readings WHERE agent_id = 'dyn-a'") == stored
    listing = {a["agent_id"]: a["status"] for a in json.loads(cli("agents", "--data-dir", str(coordinator.data_dir), "--json").stdout)}
    assert listing == {"dyn-a": "revoked", "dyn-b": "online"}
