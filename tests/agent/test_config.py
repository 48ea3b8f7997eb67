"""Config: defaults < agent.toml < env < command line, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config, update_toml
from agent.errors import AgentError


def test_precedence_toml_env_overrides(tmp_path: Path) -> None:
    update_toml(tmp_path, agent_id="dev-1", interval=5.0, sensors=["simulated", "linux"],
                rate_limits={"edge.agent.sample_now": "1/s"})
    cfg = load_config(tmp_path, env={})
    assert (cfg.agent_id, cfg.interval, cfg.sensors) == ("dev-1", 5.0, ["simulated", "linux"])
    assert cfg.rate_limits == {"edge.agent.sample_now": "1/s"}
    cfg = load_config(tmp_path, env={"EDGE_AGENT_INTERVAL": "2.5", "EDGE_AGENT_REMOTE_CONTROL": "off"})
    assert cfg.interval == 2.5 and cfg.remote_control is False
    cfg = load_config(tmp_path, env={"EDGE_AGENT_INTERVAL": "2.5"}, overrides={"interval": 1, "broker_url": None})
    assert cfg.interval == 1.0
    assert cfg.queue == "agent.dev-1" and cfg.client_id == "edge-agent-dev-1"
    assert cfg.cert_file == tmp_path / "agent.pem" and cfg.outbox_file == tmp_path / "outbox.sqlite3"


def test_data_dir_from_env(tmp_path: Path) -> None:
    cfg = load_config(None, env={"EDGE_AGENT_DATA_DIR": str(tmp_path)})
    assert cfg.data_dir == tmp_path


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("interval = -1\n", {}, "interval=-1.0 must be a positive number"),
        ("colour = 'red'\n", {}, "unknown setting 'colour'"),
        ("interval = [\n", {}, "is not valid TOML"),
        ("", {"EDGE_AGENT_OUTBOX_MAX": "many"}, "EDGE_AGENT_OUTBOX_MAX: outbox_max='many' is not a valid int"),
        ("sensors = []\n", {}, "sensors is empty"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path: Path, toml: str, env: dict, message: str) -> None:
    (tmp_path / "agent.toml").write_text(toml)
    with pytest.raises(AgentError) as info:
        load_config(tmp_path, env=env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_validate_for_run_names_the_fix(tmp_path: Path) -> None:
    cfg = AgentConfig(data_dir=tmp_path)
    with pytest.raises(AgentError, match="edge-agent keygen"):
        cfg.validate_for_run()
    cfg = AgentConfig(data_dir=tmp_path, agent_id="dev-1")
    (tmp_path / "agent.key").write_text("k")
    with pytest.raises(AgentError, match="run `edge-agent enroll`"):
        cfg.validate_for_run()
    (tmp_path / "agent.pem").write_text("c")
    (tmp_path / "ca.pem").write_text("c")
    with pytest.raises(AgentError, match="no broker_url"):
        cfg.validate_for_run()
    cfg.broker_url = "amqp://x"
    with pytest.raises(AgentError, match="mqtts://"):
        cfg.validate_for_run()
    cfg.broker_url = "mqtts://127.0.0.1:8883"
    cfg.validate_for_run()
