"""`edge-coordinator doctor`: preflight before the first start and against a running daemon.

Before `run`, the managed broker and chain are down: a warning naming `run`, not a
failure. With the daemon running, the broker check is a real TLS CONNECT with the
coordinator's certificate and the chain check a real eth_chainId. Each thing an operator
can break turns exactly its check to FAIL (exit 6) with the fix.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from security import exit_codes

from .support import CoordinatorProcess, cli

pytestmark = pytest.mark.slow


def doctor(coordinator: CoordinatorProcess, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return cli("doctor", "--data-dir", str(coordinator.data_dir), *args, env=env)


def checks(out: subprocess.CompletedProcess) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(out.stdout)["checks"]}


def test_before_first_run_managed_services_only_warn(coordinator: CoordinatorProcess) -> None:
    coordinator.init("pi-01")
    out = doctor(coordinator)
    assert out.returncode == exit_codes.OK, out.stdout + out.stderr
    assert "WARN  broker" in out.stdout and "fix: `edge-coordinator run` starts the managed broker" in out.stdout
    assert "WARN  chain" in out.stdout
    assert "FAIL" not in out.stdout
    found = checks(doctor(coordinator, "--json"))
    for name in ("CA key", "coordinator key", "broker key", "coordinator chain", "coordinator CN", "coordinator expiry",
                 "broker names", "agents", "crl", "journal", "disk"):
        assert found[name]["status"] == "OK", found[name]


def test_running_daemon_every_check_ok_then_journal_scan(coordinator: CoordinatorProcess) -> None:
    coordinator.init("pi-01").start()
    out = doctor(coordinator, "--json")
    assert out.returncode == exit_codes.OK, out.stdout + out.stderr
    found = checks(out)
    assert json.loads(out.stdout)["ok"] is True
    assert {c["status"] for c in found.values()} == {"OK"}, found
    assert "MQTT CONNECT as 'coordinator' accepted" in found["broker"]["detail"]
    assert "eth_chainId = " in found["chain"]["detail"]
    assert "passes quick_check" in found["journal"]["detail"]


def test_broken_files_fail_with_their_fix(coordinator: CoordinatorProcess) -> None:
    coordinator.init()
    pki_dir = coordinator.data_dir / "pki"
    (pki_dir / "ca.key").chmod(0o644)
    (coordinator.data_dir / "journal.db").write_bytes(b"this is not a database" * 100)
    out = doctor(coordinator)
    assert out.returncode == exit_codes.PREFLIGHT_FAILED, out.stdout
    assert "FAIL  CA key" in out.stdout and f"fix: chmod 600 {pki_dir / 'ca.key'}" in out.stdout
    assert "FAIL  journal" in out.stdout and ".recover" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    (pki_dir / "coordinator.key").unlink()
    out = doctor(coordinator)
    assert "FAIL  coordinator key" in out.stdout and "init --repair" in out.stdout


def test_broker_host_missing_from_certificate_then_renew_broker_adds_it(coordinator: CoordinatorProcess) -> None:
    coordinator.init()
    env = {"EDGE_COORDINATOR_BROKER_HOST": "coord.example.net"}
    out = doctor(coordinator, "--json", env=env)
    assert out.returncode == exit_codes.PREFLIGHT_FAILED
    names = checks(out)["broker names"]
    assert names["status"] == "FAIL" and names["fix"] == "`edge-coordinator renew broker --host coord.example.net`"
    renewed = cli("renew", "broker", "--host", "coord.example.net", "--data-dir", str(coordinator.data_dir))
    assert renewed.returncode == 0, renewed.stderr
    assert checks(doctor(coordinator, "--json", env=env))["broker names"]["status"] == "OK"
