"""The one settings loader (security/settings.py, security/settings_render.py): precedence, range checks, unknown keys and
variables, the TOML writer, and docs/CONFIG.md generated from the declarations."""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config, update_toml
from agent.errors import AgentError
from coordinator.config import load_config as load_coordinator
from coordinator.config import save_config
from coordinator.errors import CoordinatorError
from ledger.audit_config import AuditConfig, ConfigError
from security import settings, settings_render
from security.settings import SettingsError, section, setting

ROOT = Path(__file__).resolve().parents[2]
FACE_MODULES = ["agent.config", "coordinator.config", "ledger.audit_config"]


@dataclass
class _Inner:
    size: int = setting(3, min=1, help="inner size")


@dataclass
class _Toy:
    speed: float = setting(1.0, min=0, above=True, help="speed")
    name: str = setting("x", help="name")
    mode: str = setting("a", choices=("a", "b"), help="mode")
    inner: _Inner = section(_Inner, "inner")


TOY = settings.Face(tool="toy", env_prefix="TOY_", schema=_Toy, file="toy.toml", flags={"speed": "--speed"},
                    other_env={"TOY_CONFIG": "the file"})


def _load(**kw):
    return settings.load(TOY, **{"env": {}, **kw})


def test_precedence_flags_env_file_stored_default() -> None:
    assert _load().values["speed"] == 1.0 and _load().origins["speed"] == settings.DEFAULT
    assert _load(stored={"speed": 2}).values["speed"] == 2.0
    assert _load(stored={"speed": 2}, file_values={"speed": 3}, file_origin="toy.toml").values["speed"] == 3.0
    r = _load(stored={"speed": 2}, file_values={"speed": 3}, file_origin="toy.toml", env={"TOY_SPEED": "4"})
    assert (r.values["speed"], r.origins["speed"]) == (4.0, "TOY_SPEED")
    r = _load(stored={"speed": 2}, file_values={"speed": 3}, file_origin="toy.toml", env={"TOY_SPEED": "4"},
              flags={"speed": 5})
    assert (r.values["speed"], r.origins["speed"]) == (5.0, "--speed")
    r = _load(file_values={"inner": {"size": 7}}, file_origin="toy.toml", env={"TOY_INNER_SIZE": "8"})
    assert r.values["inner.size"] == 8 and settings.build(_Toy, r.values).inner.size == 8
    assert _load(flags={"speed": None}).values["speed"] == 1.0  # a flag not given is not a value


@pytest.mark.parametrize(
    ("kw", "needles"),
    [
        ({"file_values": {"speed": 0}, "file_origin": "toy.toml"}, ["toy.toml: speed=0.0 must be a positive number", "change speed in toy.toml"]),
        ({"env": {"TOY_SPEED": "-1"}}, ["TOY_SPEED: speed=-1.0 must be a positive number", "change or unset TOY_SPEED"]),
        ({"env": {"TOY_SPEED": "nan"}}, ["TOY_SPEED: speed=nan"]),
        ({"flags": {"speed": -2}}, ["--speed: speed=-2.0 must be", "change --speed"]),
        ({"env": {"TOY_INNER_SIZE": "many"}}, ["TOY_INNER_SIZE: inner.size='many' is not a valid int"]),
        ({"env": {"TOY_MODE": "c"}}, ["mode='c' must be 'a' or 'b'"]),
        ({"file_values": {"inner": {"size": True}}, "file_origin": "toy.toml"}, ["inner.size=True is not a valid int"]),
        ({"file_values": {"colour": 1}, "file_origin": "toy.toml"}, ["toy.toml: unknown setting 'colour' for toy"]),
        ({"file_values": {"inner": {"colour": 1}}, "file_origin": "toy.toml"}, ["unknown setting 'inner.colour'"]),
        ({"env": {"TOY_COLOUR": "1"}}, ["unknown environment variable TOY_COLOUR for toy", "unset it"]),
    ],
)
def test_bad_values_are_one_line_naming_the_source(kw: dict, needles: list[str]) -> None:
    with pytest.raises(SettingsError) as info:
        _load(**kw)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_declared_other_env_and_foreign_prefixes_are_accepted() -> None:
    assert _load(env={"TOY_CONFIG": "x", "TOYS": "1", "OTHER_SPEED": "9"}).values["speed"] == 1.0


@pytest.mark.parametrize(
    ("toml", "env", "needles"),
    [
        ("[worker]\nsend_timeout = -1\n", {}, ["worker.send_timeout=-1.0 must be a positive number", "coordinator.toml"]),
        ("", {"EDGE_COORDINATOR_CHAIN_BATCH_INTERVAL": "0"}, ["EDGE_COORDINATOR_CHAIN_BATCH_INTERVAL: chain.batch_interval=0.0"]),
        ("[broker]\nmax_queued_messages = -5\n", {}, ["broker.max_queued_messages=-5 must be >= 0"]),
        ("", {"EDGE_COORDINATOR_FOO": "1"}, ["unknown environment variable EDGE_COORDINATOR_FOO for edge-coordinator"]),
        ("colour = 1\n", {}, ["unknown setting 'colour' for edge-coordinator"]),
        ("[pki]\ncrl_refresh = 10.0\ncrl_validity = 5.0\n", {}, ["shorter than pki.crl_validity"]),
    ],
)
def test_coordinator_ranges_and_unknowns(tmp_path: Path, toml: str, env: dict, needles: list[str]) -> None:
    (tmp_path / "coordinator.toml").write_text(toml)
    with pytest.raises(CoordinatorError) as info:
        load_coordinator(data_dir=tmp_path, env=env)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_agent_and_audit_unknowns_use_the_same_words(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="unknown environment variable EDGE_AGENT_FOO for edge-agent"):
        load_config(tmp_path, env={"EDGE_AGENT_FOO": "1"})
    (tmp_path / "agent.toml").write_text("colour = 1\n")
    with pytest.raises(AgentError, match="unknown setting 'colour' for edge-agent"):
        load_config(tmp_path, env={})
    with pytest.raises(ConfigError, match="unknown environment variable EDGE_AUDIT_FOO for edge-audit"):
        AuditConfig.load({}, {"EDGE_AUDIT_FOO": "1"})
    conf = tmp_path / "audit.toml"
    conf.write_text("colour = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'colour' for edge-audit"):
        AuditConfig.load({"config": str(conf)}, {})
    with pytest.raises(ConfigError, match="EDGE_AUDIT_LOG_CHUNK: log_chunk=0 must be >= 1"):
        AuditConfig.load({}, {"EDGE_AUDIT_LOG_CHUNK": "0"})
    # documented non-setting variables are not refused
    load_config(tmp_path / "empty", env={"EDGE_AGENT_RUNTIME_DIR": "/x"})
    AuditConfig.load({}, {"EDGE_AUDIT_PINS": "/x", "EDGE_AUDIT_CONFIG": ""})


def test_audit_precedence_flags_env_file(tmp_path: Path) -> None:
    conf = tmp_path / "audit.toml"
    conf.write_text('rpc_url = "http://127.0.0.1:1"\nlog_chunk = 2\nrecorders = ["0xa"]\n')
    cfg = AuditConfig.load({"config": str(conf)}, {})
    assert (cfg.rpc_url, cfg.log_chunk, cfg.recorders) == ("http://127.0.0.1:1", 2, ["0xa"])
    cfg = AuditConfig.load({"config": str(conf)}, {"EDGE_AUDIT_RPC_URL": "http://127.0.0.1:2", "EDGE_AUDIT_RECORDERS": "0xb,0xc"})
    assert (cfg.rpc_url, cfg.recorders) == ("http://127.0.0.1:2", ["0xb", "0xc"])
    cfg = AuditConfig.load({"config": str(conf), "rpc_url": "http://127.0.0.1:3"}, {"EDGE_AUDIT_RPC_URL": "http://127.0.0.1:2"})
    assert cfg.rpc_url == "http://127.0.0.1:3"


def test_agent_stored_interval_sits_below_toml_env_and_flags(tmp_path: Path) -> None:
    assert load_config(tmp_path, env={}).interval_after_stored("30.0") == 30.0  # beats only the default
    assert load_config(tmp_path, env={}).interval_after_stored(None) == 60.0
    update_toml(tmp_path, interval=5.0)
    assert load_config(tmp_path, env={}).interval_after_stored("30.0") == 5.0
    assert load_config(tmp_path, env={"EDGE_AGENT_INTERVAL": "7"}).interval_after_stored("30.0") == 7.0
    assert load_config(tmp_path, env={}, overrides={"interval": 9}).interval_after_stored("30.0") == 9.0
    with pytest.raises(AgentError, match="stored state"):
        load_config(tmp_path / "other", env={}).interval_after_stored("-3")
    with pytest.raises(AgentError, match="interval=0.0 must be a positive number"):
        AgentConfig(data_dir=tmp_path, interval=0.0)


def test_one_toml_writer_round_trips(tmp_path: Path) -> None:
    update_toml(tmp_path, agent_id="dev-1", rate_limits={"edge.agent.sample_now": "1/s"}, ca_file=Path("ca.pem"),
                broker_url='mqtts://h:1/"x"')
    text = (tmp_path / "agent.toml").read_text()
    assert text.startswith("# edge-agent settings")
    data = tomllib.loads(text)
    assert data == {"agent_id": "dev-1", "rate_limits": {"edge.agent.sample_now": "1/s"}, "ca_file": "ca.pem",
                    "broker_url": 'mqtts://h:1/"x"'}
    cfg = load_coordinator(data_dir=tmp_path / "c", env={})
    cfg.broker.keepalive = 30
    save_config(cfg)
    text = cfg.config_path.read_text()
    assert "# \"dynsec\" (default)" in text  # notes become comments above their keys
    assert load_coordinator(data_dir=tmp_path / "c", env={}).broker.keepalive == 30
    assert not list(tmp_path.glob("*.tmp")) and not list((tmp_path / "c").glob("*.tmp"))


def test_coordinator_transport_options_come_from_settings(tmp_path: Path) -> None:
    pytest.importorskip("celery")
    from coordinator.celery_app import make_app

    (tmp_path / "coordinator.toml").write_text(
        "[broker]\nkeepalive = 33\npublish_timeout = 4.0\nreconnect_timeout = 70.0\ncommand_reconnect_timeout = 3.0\n")
    cfg = load_coordinator(data_dir=tmp_path, env={})
    assert cfg.chain.snapshot_interval == 5.0
    from coordinator.fleet_pki import FleetStore

    FleetStore(cfg).init()
    options = make_app(cfg, consumer=True).conf.broker_transport_options
    assert (options["keepalive"], options["publish_timeout"], options["reconnect_timeout"]) == (33, 4.0, 70.0)
    assert make_app(cfg, consumer=False).conf.broker_transport_options["reconnect_timeout"] == 3.0


def test_config_md_is_generated_from_the_declarations() -> None:
    expected = settings_render.render_markdown(settings_render.faces_from_modules(FACE_MODULES))
    actual = (ROOT / "docs" / "CONFIG.md").read_text()
    assert actual == expected, "docs/CONFIG.md is stale: run `make config-doc`"
    for face in settings_render.faces_from_modules(FACE_MODULES):
        for spec in face.specs():
            assert f"`{spec.env}`" in actual or not spec.rule.env


def test_agent_run_path_does_not_load_the_toml_writer() -> None:
    import subprocess

    code = ("import sys, tempfile; from agent.config import load_config; "
            "load_config(tempfile.mkdtemp(), env={}); print('tomli_w' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_agent_runtime_layers_the_stored_interval(tmp_path: Path) -> None:
    from agent.outbox import Outbox
    from agent.runtime import AgentRuntime

    update_toml(tmp_path, agent_id="dev-1")
    box = Outbox(tmp_path / "outbox.sqlite3", "dev-1")
    box.set_meta("interval", repr(30.0))
    box.close()
    assert AgentRuntime(None, load_config(tmp_path, env={})).interval == 30.0
    assert AgentRuntime(None, load_config(tmp_path, env={}, overrides={"interval": 2.0})).interval == 2.0
