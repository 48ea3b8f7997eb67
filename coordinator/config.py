"""The coordinator's configuration, in one typed place.

Why: every face reads the same settings from one file (`coordinator.toml` in the data
directory, written by `edge-coordinator init`) and lets the environment override any
of them (`EDGE_COORDINATOR_<SECTION>_<FIELD>`, e.g. `EDGE_COORDINATOR_BROKER_URL`), so
tests, the demo and service units need no extra flags. Bad values fail early with a
one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import CoordinatorError

CONFIG_NAME = "coordinator.toml"
ENV_PREFIX = "EDGE_COORDINATOR_"
DEFAULT_DATA_DIR = Path("var/coordinator")


@dataclass
class BrokerConfig:
    """MQTT broker: managed Mosquitto on loopback unless `url` is set."""

    url: str = ""  # external broker (mqtts://host:port); empty -> run our own Mosquitto
    host: str = "127.0.0.1"
    port: int = 8883
    max_queued_messages: int = 100000
    acl_mode: str = "file"  # "dynsec": per-agent rights at runtime; revoke also cuts live connections


@dataclass
class ChainConfig:
    """Ethereum JSON-RPC: managed anvil on loopback unless `url` is set."""

    url: str = ""  # external chain; empty -> run our own anvil
    port: int = 8545
    private_key: str = ""  # recorder account; empty -> anvil's first dev account
    contract_address: str = ""  # empty -> deploy once and remember it in the data dir
    batch_size: int = 100  # checkpoints per anchoring transaction
    batch_interval: float = 1.0
    checkpoint_interval: float = 1.0  # sign a log checkpoint at least this often (s) when records arrived
    checkpoint_every: int = 256  # ... and after this many new records


@dataclass
class HttpConfig:
    """Metrics (/metrics) and health (/healthz), loopback only."""

    host: str = "127.0.0.1"
    port: int = 9464


@dataclass
class WorkerConfig:
    """The ingest worker: one queue, acks after the journal commit."""

    queue: str = "edge.ingest"
    prefetch: int = 1  # >1 lost tasks under bursts with kombu_mqtt at the time of writing (see report)
    send_timeout: float = 30.0


@dataclass
class CoordinatorConfig:
    data_dir: Path = DEFAULT_DATA_DIR
    identity: str = "coordinator"
    log_level: str = "INFO"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)

    # -- derived paths: one layout, used by init/run/enroll/revoke alike --
    @property
    def config_path(self) -> Path:
        return self.data_dir / CONFIG_NAME

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def ca_path(self) -> Path:
        return self.pki_dir / "ca.pem"

    @property
    def crl_path(self) -> Path:
        return self.pki_dir / "crl.pem"

    @property
    def cert_path(self) -> Path:
        return self.pki_dir / f"{self.identity}.pem"

    @property
    def key_path(self) -> Path:
        return self.pki_dir / f"{self.identity}.key"

    @property
    def journal_path(self) -> Path:
        return self.data_dir / "journal.db"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def broker_url(self) -> str:
        return self.broker.url or f"mqtts://{self.broker.host}:{self.broker.port}"

    @property
    def chain_url(self) -> str:
        return self.chain.url or f"http://127.0.0.1:{self.chain.port}"

    @property
    def managed_broker(self) -> bool:
        return not self.broker.url

    @property
    def managed_chain(self) -> bool:
        return not self.chain.url


SECTIONS = {"broker": BrokerConfig, "chain": ChainConfig, "http": HttpConfig, "worker": WorkerConfig}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Turn TOML/env values into the declared field type, or say which key is wrong."""
    try:
        if typ in (int, "int"):
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if typ in (float, "float"):
            return float(value)
        if typ in (Path, "Path"):
            return Path(value).expanduser()
        if typ in (str, "str"):
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise CoordinatorError(f"config key {key!r} has invalid value {value!r}: expected {getattr(typ, '__name__', typ)}") from None
    return value


def _apply(target: Any, values: Mapping[str, Any], prefix: str) -> None:
    known = {f.name: f for f in dataclasses.fields(target)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise CoordinatorError(f"unknown config key {key!r}: valid keys are {', '.join(sorted(known))}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise CoordinatorError(f"config key {key!r} must be a [section]")
            _apply(current, value, f"{key}.")
        else:
            setattr(target, name, _coerce(value, known[name].type, key))


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """EDGE_COORDINATOR_BROKER_URL -> {"broker": {"url": ...}}; DATA_DIR -> data_dir."""
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section in SECTIONS and key:
            out.setdefault(section, {})[key] = value
        else:
            out[rest] = value
    return out


def load_config(
    path: Path | None = None,
    *,
    data_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    require_file: bool = False,
) -> CoordinatorConfig:
    """Defaults <- coordinator.toml <- environment <- explicit data_dir.

    The file is found at `path`, else $EDGE_COORDINATOR_CONFIG, else
    `<data_dir>/coordinator.toml`.
    """
    env = os.environ if env is None else env
    cfg = CoordinatorConfig()
    env_values = _env_overrides(env)
    if data_dir is not None:
        cfg.data_dir = Path(data_dir)
    elif "data_dir" in env_values:
        cfg.data_dir = Path(env_values["data_dir"])
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = Path(env[ENV_PREFIX + "CONFIG"])
    file_path = Path(path) if path is not None else cfg.config_path
    if file_path.exists():
        try:
            values = tomllib.loads(file_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise CoordinatorError(f"config file {file_path} is not valid TOML ({exc}): fix or re-run `edge-coordinator init`") from None
        if data_dir is not None:
            values.pop("data_dir", None)
        _apply(cfg, values, "")
    elif require_file:
        raise CoordinatorError(f"no config at {file_path}: run `edge-coordinator init --data-dir {cfg.data_dir}` first")
    if data_dir is not None:
        env_values.pop("data_dir", None)
    _apply(cfg, env_values, ENV_PREFIX.lower())
    if data_dir is not None:
        cfg.data_dir = Path(data_dir)
    validate(cfg)
    return cfg


def validate(cfg: CoordinatorConfig) -> None:
    for name, port in (("broker.port", cfg.broker.port), ("chain.port", cfg.chain.port), ("http.port", cfg.http.port)):
        if not 0 <= port <= 65535:
            raise CoordinatorError(f"config key {name!r} = {port} is not a TCP port (0-65535)")
    if cfg.broker.url and not cfg.broker.url.startswith(("mqtt://", "mqtts://")):
        raise CoordinatorError(f"broker.url {cfg.broker.url!r} must start with mqtts:// (or mqtt:// for tests)")
    if cfg.chain.url and not cfg.chain.url.startswith(("http://", "https://")):
        raise CoordinatorError(f"chain.url {cfg.chain.url!r} must be an http(s):// JSON-RPC endpoint")
    if cfg.broker.acl_mode not in ("file", "dynsec"):
        raise CoordinatorError(f"broker.acl_mode {cfg.broker.acl_mode!r} must be 'file' or 'dynsec'")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise CoordinatorError(f"log_level {cfg.log_level!r} must be DEBUG, INFO, WARNING or ERROR")
    if cfg.chain.batch_size < 1:
        raise CoordinatorError("chain.batch_size must be at least 1")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_toml(cfg: CoordinatorConfig) -> str:
    """The config as TOML, every key written so operators can see what to change."""
    lines = ["# edge-coordinator configuration; env EDGE_COORDINATOR_<SECTION>_<KEY> overrides", ""]
    lines.append(f"data_dir = {_toml_value(cfg.data_dir)}")
    lines.append(f"identity = {_toml_value(cfg.identity)}")
    lines.append(f"log_level = {_toml_value(cfg.log_level)}")
    for section in SECTIONS:
        lines.append("")
        lines.append(f"[{section}]")
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
    return "\n".join(lines) + "\n"


def save_config(cfg: CoordinatorConfig) -> Path:
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    cfg.config_path.write_text(render_toml(cfg))
    return cfg.config_path
