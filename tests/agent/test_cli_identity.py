"""`edge-agent run` refuses an agent id that is not its certificate's CN."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from security import pki
from tests.support.mosquitto import FleetPKI

ROOT = Path(__file__).resolve().parents[2]


def agent(data: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "--data-dir", str(data), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_run_refuses_an_id_other_than_the_certificate_cn(tmp_path: Path, test_pki: FleetPKI) -> None:
    data = tmp_path / "data"
    assert agent(data, "keygen", "--id", "dev-7").returncode == 0
    cert = tmp_path / "dev-7.pem"
    pki.write_pem(test_pki.ca.issue(pki.load_csr(data / "agent.csr")), cert)
    out = agent(data, "enroll", "--cert", str(cert), "--ca", str(test_pki.ca_path), "--broker-url", "mqtts://127.0.0.1:1")
    assert out.returncode == 0, out.stderr
    out = agent(data, "run", env={"EDGE_AGENT_AGENT_ID": "dev-8"})
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (f"edge-agent: agent id 'dev-8' differs from the certificate's CN 'dev-7' ({data / 'agent.pem'}): "
                                  f"set agent_id = \"dev-7\" in {data / 'agent.toml'} (and unset EDGE_AGENT_AGENT_ID), "
                                  "or enroll a certificate for this id")
