"""The three real CLIs refuse bad settings the same way: one stderr line naming the key,
file, environment variable or flag, and the fix (security/settings.py, docs/CONFIG.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import one_line_error

ROOT = Path(__file__).resolve().parents[2]
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}


def tool(module: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**CLEAN_ENV, **(env or {})})


def test_edge_agent(tmp_path: Path) -> None:
    data = str(tmp_path)
    assert tool("agent.cli", "status", "--data-dir", data).returncode == 0
    one_line_error(tool("agent.cli", "status", "--data-dir", data, env={"EDGE_AGENT_FOO": "1"}), 1,
                   "edge-agent: unknown environment variable EDGE_AGENT_FOO", "unset it")
    one_line_error(tool("agent.cli", "status", "--data-dir", data, env={"EDGE_AGENT_OUTBOX_MAX": "-5"}), 1,
                   "EDGE_AGENT_OUTBOX_MAX: outbox_max=-5 must be >= 1", "change or unset EDGE_AGENT_OUTBOX_MAX")
    one_line_error(tool("agent.cli", "run", "--data-dir", data, "--interval", "-1"), 1,
                   "--interval: interval=-1.0 must be a positive number", "change --interval")
    (tmp_path / "agent.toml").write_text("publish_timeout = 0\n")
    one_line_error(tool("agent.cli", "status", "--data-dir", data), 1,
                   "agent.toml: publish_timeout=0.0 must be a positive number")
    (tmp_path / "agent.toml").write_text("colour = 'red'\n")
    one_line_error(tool("agent.cli", "status", "--data-dir", data), 1, "unknown setting 'colour' for edge-agent")
    # precedence: the environment beats agent.toml, a flag beats both
    (tmp_path / "agent.toml").write_text("interval = 5.0\n")
    out = tool("agent.cli", "status", "--json", "--data-dir", data, env={"EDGE_AGENT_INTERVAL": "7"})
    assert out.returncode == 0 and '"interval": 7.0' in out.stdout, out.stderr


def test_edge_coordinator(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    one_line_error(tool("coordinator.cli", "init", "--data-dir", data, "--broker-port", "70000"), 1,
                   "--broker-port: broker.port=70000 must be 0-65535")
    assert tool("coordinator.cli", "init", "--data-dir", data, "--http-port", "0").returncode == 0
    assert tool("coordinator.cli", "agents", "--data-dir", data).returncode == 0
    one_line_error(tool("coordinator.cli", "agents", "--data-dir", data, env={"EDGE_COORDINATOR_FOO": "1"}), 1,
                   "edge-coordinator: unknown environment variable EDGE_COORDINATOR_FOO", "unset it")
    one_line_error(tool("coordinator.cli", "agents", "--data-dir", data,
                        env={"EDGE_COORDINATOR_CHAIN_BATCH_INTERVAL": "0"}), 1,
                   "EDGE_COORDINATOR_CHAIN_BATCH_INTERVAL: chain.batch_interval=0.0 must be a positive number")
    config = Path(data) / "coordinator.toml"
    config.write_text(config.read_text().replace("send_timeout = 30.0", "send_timeout = -1"))
    one_line_error(tool("coordinator.cli", "agents", "--data-dir", data), 1,
                   "coordinator.toml: worker.send_timeout=-1.0 must be a positive number", "change worker.send_timeout")
    config.write_text(config.read_text().replace("send_timeout = -1", "send_timeout = 30.0") + "[bogus]\nx = 1\n")
    one_line_error(tool("coordinator.cli", "agents", "--data-dir", data), 1, "unknown setting 'bogus' for edge-coordinator")


@pytest.mark.parametrize(
    ("env", "argv", "needles"),
    [
        ({"EDGE_AUDIT_FOO": "1"}, [], ["edge-audit: unknown environment variable EDGE_AUDIT_FOO", "unset it"]),
        ({"EDGE_AUDIT_LOG_CHUNK": "0"}, [], ["EDGE_AUDIT_LOG_CHUNK: log_chunk=0 must be >= 1"]),
        ({}, ["--rpc-url", "ftp://x"], ["--rpc-url: rpc_url='ftp://x' must be empty or http://"]),
    ],
)
def test_edge_audit(tmp_path: Path, env: dict, argv: list[str], needles: list[str]) -> None:
    one_line_error(tool("ledger.audit_cli", "--journal", str(tmp_path / "j.db"), *argv, "list", env=env), 2, *needles)


def test_edge_audit_unknown_toml_key(tmp_path: Path) -> None:
    conf = tmp_path / "audit.toml"
    conf.write_text("colour = 1\n")
    one_line_error(tool("ledger.audit_cli", "list", env={"EDGE_AUDIT_CONFIG": str(conf)}), 2,
                   f"{conf}: unknown setting 'colour' for edge-audit")


def test_edge_agent_stored_interval_sits_below_toml_env_and_flags(tmp_path: Path) -> None:
    """The interval kept by a `set_interval` command (outbox meta) replaces only the default."""
    import json

    from agent.config import update_toml
    from agent.outbox import Outbox

    data = str(tmp_path)
    update_toml(tmp_path, agent_id="dev-1")
    box = Outbox(tmp_path / "outbox.sqlite3", "dev-1")
    box.set_meta("interval", repr(30.0))  # what AgentRuntime.set_interval stores
    box.close()

    def interval(env: dict[str, str] | None = None) -> float:
        out = tool("agent.cli", "status", "--json", "--data-dir", data, env=env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["interval"]

    assert interval() == 30.0  # stored state beats the default
    update_toml(tmp_path, interval=5.0)
    assert interval() == 5.0  # agent.toml beats stored state
    assert interval({"EDGE_AGENT_INTERVAL": "7"}) == 7.0  # the environment beats agent.toml
