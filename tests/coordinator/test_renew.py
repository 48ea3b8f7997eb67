"""Certificate renewal end to end: a real `edge-coordinator run` and a real `edge-agent run`.

The agent streams readings with certificate A; the operator renews (`edge-agent renew
--csr`, `edge-coordinator renew ID --csr`, `edge-agent renew --cert`) while it runs. It
keeps sending with A (still valid, not revoked: no downtime); after SIGHUP the same
process signs with B. Every reading arrives exactly once (seq 1..N, no gap, no duplicate), the
journal shows A's fingerprint before and B's after, and `agents` shows B's expiry.
Enroll's "second certificate needs --force" rule still holds; renew is the legitimate path.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from security import exit_codes
from security.pki import fingerprint, load_certificate

from .support import CoordinatorProcess, cli, wait_until
from .test_revocation import agent_cli, enroll_agent, readings, run_agent

pytestmark = pytest.mark.slow


def served_serial(coordinator: CoordinatorProcess) -> int:
    """Serial of the certificate the broker presents in a new TLS handshake (as the coordinator)."""
    pki_dir = coordinator.data_dir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
    ctx.load_cert_chain(str(pki_dir / "coordinator.pem"), str(pki_dir / "coordinator.key"))
    with socket.create_connection(("127.0.0.1", coordinator.broker_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def signers(coordinator: CoordinatorProcess, agent: str) -> list[tuple[int, str]]:
    return coordinator.query(
        "SELECT r.seq, e.signer_fingerprint FROM readings r JOIN executions e ON e.task_id = r.task_id "
        "WHERE r.agent_id = ? ORDER BY r.seq", (agent,))


def test_renew_while_running_keeps_every_reading_and_switches_certificate(coordinator: CoordinatorProcess,
                                                                          tmp_path: Path) -> None:
    coordinator.init("rn-01").start()
    home = enroll_agent(coordinator, "rn-01", tmp_path / "rn-01")
    old = load_certificate(home / "agent.pem")
    agent = run_agent(home, interval="0.2")
    try:
        wait_until(lambda: readings(coordinator, "rn-01") >= 5, 60, "readings with the first certificate")

        # enroll still refuses a second certificate for an active id without --force
        out = agent_cli(home, "renew", "--csr")
        assert out.returncode == 0, out.stderr
        csr = home / "agent.csr"
        refused = cli("enroll", str(csr), "--data-dir", str(coordinator.data_dir))
        assert refused.returncode == exit_codes.USAGE and "already has a valid certificate" in refused.stderr
        assert "edge-coordinator renew rn-01 --csr FILE" in refused.stderr  # the legitimate path is named

        new_pem = tmp_path / "rn-01-new.pem"
        out = cli("renew", "rn-01", "--csr", str(csr), "--days", "400", "--out", str(new_pem),
                  "--data-dir", str(coordinator.data_dir))
        assert out.returncode == 0, out.stderr
        new = load_certificate(new_pem)
        assert new.serial_number != old.serial_number and new.not_valid_after_utc > old.not_valid_after_utc

        out = agent_cli(home, "renew", "--cert", str(new_pem))
        assert out.returncode == 0, out.stderr
        assert f"serial {new.serial_number:x}" in out.stdout
        assert load_certificate(home / "agent.pem").serial_number == new.serial_number

        # no downtime: the running agent keeps sending with its current (still valid) certificate
        before = readings(coordinator, "rn-01")
        wait_until(lambda: readings(coordinator, "rn-01") >= before + 5, 60, "readings after the install")
        assert agent.proc is not None and agent.proc.poll() is None

        # SIGHUP (`systemctl reload edge-agent`): the same process signs with the new certificate
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: fingerprint(new) in [fp for _, fp in signers(coordinator, "rn-01")], 60,
                   "a reading signed with the renewed certificate")
        agent.wait_for_output(f"now signing with certificate serial {new.serial_number:x}", timeout=30)
        assert agent.proc.poll() is None  # no restart
        switched = readings(coordinator, "rn-01")
        wait_until(lambda: readings(coordinator, "rn-01") >= switched + 5, 60, "readings after the reload")
    finally:
        agent.stop(signal.SIGTERM)

    status = json.loads(agent_cli(home, "status", "--json").stdout)
    sent = status["outbox"]["next_seq"] - 1
    wait_until(lambda: readings(coordinator, "rn-01") == sent, 60, f"all {sent} readings journaled")
    rows = signers(coordinator, "rn-01")
    assert [seq for seq, _ in rows] == list(range(1, sent + 1))  # exactly once each, no gap
    prints = [fp for _, fp in rows]
    assert prints[0] == fingerprint(old) and prints[-1] == fingerprint(new)
    switch = prints.index(fingerprint(new))
    assert set(prints[:switch]) == {fingerprint(old)} and set(prints[switch:]) == {fingerprint(new)}

    views = {v["agent_id"]: v for v in json.loads(cli("agents", "--json", "--data-dir", str(coordinator.data_dir)).stdout)}
    assert views["rn-01"]["cert_not_after"] == new.not_valid_after_utc.timestamp()
    assert views["rn-01"]["presented_not_after"] == new.not_valid_after_utc.timestamp()
    assert views["rn-01"]["status"] != "revoked"


def test_renew_refusals(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    coordinator.init("rn-02", "rn-03")
    home = enroll_agent(coordinator, "rn-02", tmp_path / "rn-02")
    assert agent_cli(home, "renew", "--csr").returncode == 0
    csr = str(home / "agent.csr")
    data = ("--data-dir", str(coordinator.data_dir))

    wrong = cli("renew", "rn-03", "--csr", csr, *data)
    assert wrong.returncode == exit_codes.USAGE and "the CSR is for 'rn-02', not 'rn-03'" in wrong.stderr
    assert "Traceback" not in wrong.stderr

    no_csr = cli("renew", "rn-02", *data)
    assert no_csr.returncode == exit_codes.USAGE and "edge-agent renew --csr" in no_csr.stderr

    assert cli("revoke", "rn-02", *data).returncode == 0
    revoked = cli("renew", "rn-02", "--csr", csr, *data)
    assert revoked.returncode == exit_codes.USAGE and "is revoked" in revoked.stderr

    # the agent refuses to install its current certificate again, or one for another key
    same = agent_cli(home, "renew", "--cert", str(home / "agent.pem"))
    assert same.returncode == exit_codes.ERROR and "already installed" in same.stderr
    other = agent_cli(home, "renew", "--cert", str(coordinator.bundle("rn-03") / "rn-03.pem"))
    assert other.returncode == exit_codes.ERROR and "does not match this device's key" in other.stderr


def test_renew_self_reissues_coordinator_and_broker_with_the_same_keys(coordinator: CoordinatorProcess) -> None:
    coordinator.init("rn-04").start()
    pki_dir = coordinator.data_dir / "pki"
    before = {n: load_certificate(pki_dir / f"{n}.pem") for n in ("coordinator", "broker")}
    out = cli("renew", "--self", "--host", "coord.example.net", "--data-dir", str(coordinator.data_dir))
    assert out.returncode == 0, out.stderr
    assert "told the broker" in out.stdout
    after = {n: load_certificate(pki_dir / f"{n}.pem") for n in ("coordinator", "broker")}
    for name in before:
        assert after[name].serial_number != before[name].serial_number
        assert after[name].public_key() == before[name].public_key()
    from coordinator.fleet_pki import broker_hosts

    assert set(broker_hosts(pki_dir / "broker.pem")) == {"localhost", "127.0.0.1", "coord.example.net"}
    # Mosquitto re-read its certificate on SIGHUP: a new handshake is served the new one
    wait_until(lambda: served_serial(coordinator) == after["broker"].serial_number, 30, "broker serving the new certificate")
    # the running daemon and broker go on; doctor's real TLS CONNECT works with the reloaded broker
    found = json.loads(cli("doctor", "--json", "--data-dir", str(coordinator.data_dir)).stdout)
    checks = {c["name"]: c["status"] for c in found["checks"]}
    assert checks["broker"] == "OK" and checks["coordinator chain"] == "OK" and checks["broker names"] == "OK"
