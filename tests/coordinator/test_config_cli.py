"""The CLI's help, init/enroll/revoke/agents and its one-line error paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from coordinator.cli import main
from coordinator.config import load_config
from coordinator.errors import CoordinatorError
from security.pki import generate_key, make_csr, write_pem

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("command", ["", "init", "run", "enroll", "revoke", "agents", "send", "result", "demo", "doctor", "renew"])
def test_help_everywhere(command: str) -> None:
    argv = [command, "--help"] if command else ["--help"]
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    assert "usage: edge-coordinator" in proc.stdout
    assert "--data-dir" in proc.stdout or not command


def test_init_writes_pki_and_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "d"
    assert main(["init", "--data-dir", str(data), "--broker-port", "18999", "--http-port", "0"]) == 0
    for name in ("ca.pem", "ca.key", "coordinator.pem", "coordinator.key", "broker.pem", "broker.key", "crl.pem"):
        assert (data / "pki" / name).exists(), name
    assert oct((data / "pki" / "ca.key").stat().st_mode & 0o777) == "0o600"
    cfg = load_config(data_dir=data, require_file=True)
    assert cfg.broker.port == 18999 and cfg.http.port == 0
    assert cfg.broker_url == "mqtts://127.0.0.1:18999"
    # a second init on the same dir refuses instead of replacing the CA
    assert main(["init", "--data-dir", str(data)]) == 1
    assert "already holds a CA" in capsys.readouterr().err


def test_env_overrides_file(tmp_path: Path) -> None:
    main(["init", "--data-dir", str(tmp_path)])
    cfg = load_config(data_dir=tmp_path, env={"EDGE_COORDINATOR_BROKER_PORT": "1234", "EDGE_COORDINATOR_CHAIN_URL": "http://127.0.0.1:9"})
    assert cfg.broker.port == 1234
    assert cfg.chain_url == "http://127.0.0.1:9" and not cfg.managed_chain


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[broker]\nport = 'abc'\n", "broker.port"),
        ("[broker]\nport = 70000\n", "broker.port=70000 must be 0-65535"),
        ("[bogus]\nx = 1\n", "unknown setting 'bogus'"),
        ("[chain]\nurl = 'ftp://x'\n", "JSON-RPC"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_is_one_actionable_line(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "coordinator.toml").write_text(toml)
    with pytest.raises(CoordinatorError, match=message):
        load_config(data_dir=tmp_path, env={})
    proc = run_cli("agents", "--data-dir", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("edge-coordinator: ")


def test_missing_data_dir_says_run_init(tmp_path: Path) -> None:
    proc = run_cli("agents", "--data-dir", str(tmp_path / "none"))
    assert proc.returncode == 1
    assert "run `edge-coordinator init" in proc.stderr and "Traceback" not in proc.stderr


def test_enroll_csr_and_bundle_then_revoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "d"
    main(["init", "--data-dir", str(data)])
    key = generate_key()
    write_pem(make_csr(key, "dev-1"), tmp_path / "dev-1.csr")
    assert main(["enroll", "--data-dir", str(data), str(tmp_path / "dev-1.csr"), "--out", str(tmp_path / "dev-1.pem")]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "dev-1.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((data / "pki" / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=dev-1"

    assert main(["enroll", "--data-dir", str(data), "--bundle", "sim-1"]) == 0
    bundle = data / "bundles" / "sim-1"
    # log.pub: the coordinator's transparency-log verifier key (issue #12)
    assert {p.name for p in bundle.iterdir()} == {"ca.pem", "crl.pem", "sim-1.pem", "sim-1.key", "agent.toml", "log.pub"}
    import tomllib

    agent = tomllib.loads((bundle / "agent.toml").read_text())
    assert agent["agent_id"] == "sim-1" and agent["broker_url"].startswith("mqtts://127.0.0.1:")
    capsys.readouterr()
    assert main(["agents", "--data-dir", str(data), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"dev-1"' in out and '"sim-1"' in out and "never-seen" in out

    assert main(["revoke", "--data-dir", str(data), "sim-1"]) == 0
    crl = x509.load_pem_x509_crl((data / "pki" / "crl.pem").read_bytes())
    serial = x509.load_pem_x509_certificate((bundle / "sim-1.pem").read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert crl.is_signature_valid(ca.public_key())
    capsys.readouterr()
    main(["agents", "--data-dir", str(data)])
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("sim-1")][0].split()[1] == "revoked"


def test_enroll_error_paths(tmp_path: Path) -> None:
    data = tmp_path / "d"
    main(["init", "--data-dir", str(data)])
    (tmp_path / "junk.csr").write_text("not a csr")
    for argv, message in [
        (["enroll", str(tmp_path / "junk.csr")], "not a PEM certificate signing request"),
        (["enroll", str(tmp_path / "missing.csr")], "cannot read CSR"),
        (["enroll"], "nothing to enroll"),
        (["enroll", "--bundle", "coordinator"], "reserved"),
        (["enroll", "--bundle", "bad/name"], "invalid identity"),
        (["revoke", "nobody"], "no certificate was issued"),
    ]:
        proc = run_cli(*argv, "--data-dir", str(data))
        assert proc.returncode == 1, (argv, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)


def test_unreachable_broker_and_chain_are_one_line_errors(tmp_path: Path) -> None:
    from tests.support.net import free_port

    data = tmp_path / "d"
    closed = free_port()
    assert main(["init", "--data-dir", str(data), "--broker-url", f"mqtts://127.0.0.1:{closed}",
                 "--chain-url", f"http://127.0.0.1:{closed}"]) == 0
    assert main(["enroll", "--data-dir", str(data), "--bundle", "someone"]) == 0  # unenrolled ids are refused first
    proc = run_cli("send", "--data-dir", str(data), "someone", "status", "--timeout", "2",
                   env={"EDGE_COORDINATOR_BROKER_URL": f"mqtts://127.0.0.1:{closed}"})
    assert proc.returncode == 5 and "Traceback" not in proc.stderr, proc.stderr  # exit_codes.NOT_DELIVERED
    assert proc.stderr.startswith("edge-coordinator: cannot reach the broker") and proc.stderr.count("\n") == 1
    proc = run_cli("run", "--data-dir", str(data))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot reach the broker" in proc.stderr
    # broker reachable (a listening socket) but the chain is not
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc = run_cli("run", "--data-dir", str(data), env={"EDGE_COORDINATOR_BROKER_URL": f"mqtts://127.0.0.1:{port}"})
    assert proc.returncode == 1 and "cannot reach the chain" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_send_rejects_unknown_command(tmp_path: Path) -> None:
    main(["init", "--data-dir", str(tmp_path / "d")])
    proc = run_cli("send", "--data-dir", str(tmp_path / "d"), "a1", "reboot")
    assert proc.returncode == 2 and "unknown command 'reboot'" in proc.stderr  # exit_codes.USAGE


def test_command_names_and_argument_parsing() -> None:
    from coordinator.dispatch import command_name, parse_args

    assert command_name("status") == "edge.agent.status"
    assert command_name("edge.agent.sample_now") == "edge.agent.sample_now"
    assert parse_args(["5", "2.5", "null", '"temp"', "temp"]) == [5, 2.5, None, "temp", "temp"]
    with pytest.raises(CoordinatorError, match="unknown command"):
        command_name("edge.agent.reboot")


def test_dynsec_is_the_default_and_file_mode_is_labelled_unsafe(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from coordinator.daemon import Coordinator

    data = tmp_path / "d"
    assert main(["init", "--data-dir", str(data)]) == 0
    cfg = load_config(data_dir=data, require_file=True)
    assert cfg.broker.acl_mode == "dynsec"
    assert "UNSAFE" in (data / "coordinator.toml").read_text()
    assert "UNSAFE" in run_cli("init", "--help").stdout
    with caplog.at_level(logging.WARNING, logger="edgeledger.coordinator"):
        Coordinator(cfg)._warn_unsafe_acl()
        assert not caplog.records
        cfg.broker.acl_mode = "file"
        Coordinator(cfg)._warn_unsafe_acl()
    assert any("UNSAFE" in r.getMessage() and "dynsec" in r.getMessage() for r in caplog.records)


def test_crl_settings_are_validated_and_overridable(tmp_path: Path) -> None:
    cfg = load_config(data_dir=tmp_path, env={"EDGE_COORDINATOR_PKI_CRL_VALIDITY": "3600", "EDGE_COORDINATOR_PKI_CRL_REFRESH": "600"})
    assert (cfg.pki.crl_validity, cfg.pki.crl_refresh) == (3600.0, 600.0)
    with pytest.raises(CoordinatorError, match="crl_refresh"):
        load_config(data_dir=tmp_path, env={"EDGE_COORDINATOR_PKI_CRL_REFRESH": "7200", "EDGE_COORDINATOR_PKI_CRL_VALIDITY": "3600"})
