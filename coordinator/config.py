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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    # "dynsec" (default): Mosquitto's dynamic-security plugin checks SUBSCRIBE too (no
    # agent can join another queue's $share group), enroll/revoke change rights at
    # runtime and revoke cuts the live connection. "file" is UNSAFE for fleets: acl_file
    # never checks SUBSCRIBE (any agent can drop others' readings) and a revoked agent
    # keeps its live connection; kept only for brokers without the plugin.
    acl_mode: str = "dynsec"


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
class MonitorConfig:
    """What /healthz, the fleet page and the per-agent metrics judge against."""

    heartbeat_interval: float = 300.0  # the agents' heartbeat_interval (agent.toml); heard from within
    missed_heartbeats: float = 2.0  # heartbeat_interval * missed_heartbeats -> "online", else "stale"
    anchor_lag_max: float = 300.0  # /healthz fails when the oldest unanchored journal row is older (seconds)
    journal_probe_timeout: float = 2.0  # /healthz: seconds the journal write probe may wait for the lock


@dataclass
class WorkerConfig:
    """The ingest worker: one queue, acks after the journal commit."""

    queue: str = "edge.ingest"
    prefetch: int = 1  # tasks held unacked by the solo worker; each is committed on its own (no batching yet)
    send_timeout: float = 30.0
    # End-to-end receipts (coordinator/receipts.py): one per agent with news at most every
    # receipt_interval seconds, sooner after receipt_batch new readings.
    receipt_interval: float = 6.0  # <= 5 receipts per 30 s to a busy agent
    receipt_batch: int = 200


@dataclass
class PkiConfig:
    """Fleet CRL lifetime: agents and Mosquitto refuse a CRL past its next-update.

    `crl_validity` (seconds, default 7 days) is how long each issued CRL stays valid;
    `crl_refresh` (seconds, default 1 day) is how often the running daemon re-issues it
    and pushes it to every agent (`edge.agent.update_crl`). An agent that misses pushes
    for longer than crl_validity refuses coordinator commands until the next push.
    """

    crl_validity: float = 7 * 24 * 3600.0
    crl_refresh: float = 24 * 3600.0


@dataclass
class CoordinatorConfig:
    data_dir: Path = DEFAULT_DATA_DIR
    identity: str = "coordinator"
    log_level: str = "INFO"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    pki: PkiConfig = field(default_factory=PkiConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

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
    def quarantine_path(self) -> Path:
        return self.data_dir / "quarantine.sqlite"

    @property
    def stale_after(self) -> float:
        """Seconds of silence after which an agent is no longer "online"."""
        return self.monitor.heartbeat_interval * self.monitor.missed_heartbeats

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


SECTIONS = {"broker": BrokerConfig, "chain": ChainConfig, "http": HttpConfig, "worker": WorkerConfig,
            "pki": PkiConfig, "monitor": MonitorConfig}


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
    if not cfg.pki.crl_validity > 0 or not 0 < cfg.pki.crl_refresh < cfg.pki.crl_validity:
        raise CoordinatorError(
            f"pki.crl_refresh ({cfg.pki.crl_refresh:g}s) must be positive and shorter than pki.crl_validity "
            f"({cfg.pki.crl_validity:g}s): agents would see the CRL go stale between pushes"
        )
    for name, value in (("monitor.heartbeat_interval", cfg.monitor.heartbeat_interval),
                        ("monitor.missed_heartbeats", cfg.monitor.missed_heartbeats),
                        ("monitor.anchor_lag_max", cfg.monitor.anchor_lag_max),
                        ("monitor.journal_probe_timeout", cfg.monitor.journal_probe_timeout)):
        if not value > 0:
            raise CoordinatorError(f"config key {name!r} = {value!r} must be a positive number of seconds")
    if cfg.chain.batch_size < 1:
        raise CoordinatorError("chain.batch_size must be at least 1")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


#: Comments written above a key in coordinator.toml (the choices an operator must get right).
NOTES = {
    ("broker", "acl_mode"): '"dynsec" (default): subscriptions checked, revoke cuts live connections. "file" is UNSAFE: '
                            "SUBSCRIBE unchecked (any agent can drop others' readings), revoked agents stay connected",
    ("pki", "crl_validity"): "seconds each issued CRL stays valid (next-update); agents and Mosquitto refuse it after",
    ("pki", "crl_refresh"): "seconds between CRL re-issue + push to agents by `run` (must be < crl_validity)",
}


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
            if (section, f.name) in NOTES:
                lines.append(f"# {NOTES[(section, f.name)]}")
            lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
    return "\n".join(lines) + "\n"


def save_config(cfg: CoordinatorConfig) -> Path:
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    cfg.config_path.write_text(render_toml(cfg))
    return cfg.config_path
