"""The agent's configuration: one typed dataclass, from `agent.toml` + `EDGE_AGENT_*` env.

Why one place: the CLI, the worker, the sampler and `status` all read the same
settings, and every bad value is reported once, as one line that says how to fix it.
Precedence: defaults < `<data_dir>/agent.toml` < environment < command-line overrides.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import AgentError

ENV_PREFIX = "EDGE_AGENT_"
CONFIG_NAME = "agent.toml"
DEFAULT_DATA_DIR = Path("/var/lib/edge-agent")

# File names inside the data dir (kept fixed so a bundle or a backup is predictable).
KEY_NAME = "agent.key"
CSR_NAME = "agent.csr"
CERT_NAME = "agent.pem"
CA_NAME = "ca.pem"
CRL_NAME = "crl.pem"
OUTBOX_NAME = "outbox.sqlite3"


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(ENV_PREFIX + "DATA_DIR") or DEFAULT_DATA_DIR)


@dataclass
class AgentConfig:
    """Everything the agent needs; paths default to fixed names inside `data_dir`."""

    data_dir: Path
    agent_id: str = ""
    broker_url: str = ""
    sensors: list[str] = field(default_factory=lambda: ["simulated"])
    interval: float = 60.0  # seconds between samples
    heartbeat_interval: float = 300.0  # seconds between edge.heartbeat messages; 0 turns them off
    broker_heartbeat: float = 60.0  # MQTT keepalive; one PINGREQ per interval when idle
    outbox_max: int = 100_000  # rows kept while offline; oldest dropped beyond
    flush_batch: int = 200  # rows read per flush round
    # A reading leaves the outbox only on the coordinator's signed receipt (it journaled it);
    # one still unconfirmed this many seconds after its publish is sent again (deduped there).
    resend_after: float = 60.0
    backoff_min: float = 0.5  # first retry delay after a failed flush (jittered)
    backoff_max: float = 30.0
    publish_timeout: float = 10.0  # seconds to wait for a PUBACK
    rate_limits: dict[str, str] = field(default_factory=lambda: {"edge.agent.sample_now": "30/m"})
    remote_control: bool = False  # pidbox (celery inspect/control); the fleet broker ACL denies it to agents
    signing: bool = True  # sign tasks and results (security.signing_setup)
    # Certificate CNs allowed to send commands (the coordinator's identity); [] = any fleet certificate.
    command_signers: list[str] = field(default_factory=lambda: ["coordinator"])
    log_level: str = "WARNING"
    key_file: Path | None = None
    cert_file: Path | None = None
    ca_file: Path | None = None
    crl_file: Path | None = None
    outbox_file: Path | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        d = self.data_dir
        self.key_file = Path(self.key_file) if self.key_file else d / KEY_NAME
        self.cert_file = Path(self.cert_file) if self.cert_file else d / CERT_NAME
        self.ca_file = Path(self.ca_file) if self.ca_file else d / CA_NAME
        self.crl_file = Path(self.crl_file) if self.crl_file else d / CRL_NAME
        self.outbox_file = Path(self.outbox_file) if self.outbox_file else d / OUTBOX_NAME
        self._check_values()

    # -- derived names -------------------------------------------------
    @property
    def queue(self) -> str:
        """The only queue this agent consumes."""
        return f"agent.{self.agent_id}"

    @property
    def client_id(self) -> str:
        """Stable MQTT client id of the consuming connection (persistent session)."""
        return f"edge-agent-{self.agent_id}"

    @property
    def csr_file(self) -> Path:
        return self.data_dir / CSR_NAME

    # -- validation ----------------------------------------------------
    def _check_values(self) -> None:
        for name in ("interval", "broker_heartbeat", "backoff_min", "backoff_max", "publish_timeout", "resend_after"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise AgentError(f"config {name}={value!r} must be a positive number of seconds")
        if not (math.isfinite(self.heartbeat_interval) and self.heartbeat_interval >= 0):
            raise AgentError(f"config heartbeat_interval={self.heartbeat_interval!r} must be >= 0 (0 = off)")
        if self.backoff_max < self.backoff_min:
            raise AgentError("config backoff_max must be >= backoff_min")
        for name in ("outbox_max", "flush_batch"):
            if getattr(self, name) < 1:
                raise AgentError(f"config {name} must be >= 1")
        if not self.sensors:
            raise AgentError("config sensors is empty: list at least one, e.g. sensors = [\"simulated\"]")

    def require_identity(self) -> None:
        if not self.agent_id:
            raise AgentError(f"no agent id in {self.data_dir / CONFIG_NAME}: run `edge-agent keygen --id NAME`")

    def validate_for_run(self) -> None:
        """Everything `run` needs is present; raise the first missing piece as one line."""
        self.require_identity()
        if not self.key_file.exists():
            raise AgentError(f"private key {self.key_file} missing: run `edge-agent keygen --id {self.agent_id}`")
        if not self.cert_file.exists():
            raise AgentError(f"certificate {self.cert_file} missing: run `edge-agent enroll`")
        if not self.ca_file.exists():
            raise AgentError(f"CA certificate {self.ca_file} missing: run `edge-agent enroll`")
        if not self.broker_url:
            raise AgentError(
                f"no broker_url: set it in {self.data_dir / CONFIG_NAME}, EDGE_AGENT_BROKER_URL or `run --broker-url`"
            )
        scheme = urlparse(self.broker_url).scheme
        if scheme not in ("mqtts", "mqtt"):
            raise AgentError(f"broker_url {self.broker_url!r} must be mqtts://host:port")


# -- loading ----------------------------------------------------------------

def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(AgentConfig)}


def _coerce(name: str, value: Any, *, source: str) -> Any:
    """Turn a TOML or env value into the field's type; one-line error otherwise."""
    f = _fields()[name]
    kind = str(f.type)
    try:
        if kind == "float":
            return float(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind == "list[str]":
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            return [str(v) for v in value]
        if kind == "dict[str, str]":
            if isinstance(value, str):  # env: "task=rate,task2=rate"
                pairs = (p.split("=", 1) for p in value.split(",") if p.strip())
                return {k.strip(): v.strip() for k, v in pairs}
            return {str(k): str(v) for k, v in dict(value).items()}
        if "Path" in kind:
            return Path(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise AgentError(f"{source}: {name}={value!r} is not a valid {kind}") from exc


def read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise AgentError(f"{path} is not valid TOML ({exc}): fix or delete it") from exc
    return data.get("agent", data) if isinstance(data.get("agent"), dict) else data


def load_config(
    data_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the config: defaults < agent.toml < EDGE_AGENT_* < overrides (non-None only)."""
    env = os.environ if env is None else env
    data_dir = Path(data_dir) if data_dir else default_data_dir(env)
    known = _fields()
    values: dict[str, Any] = {}
    path = data_dir / CONFIG_NAME
    for key, value in read_toml(path).items():
        if key not in known or key == "data_dir":
            raise AgentError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(k for k in known if k != 'data_dir'))}")
        values[key] = _coerce(key, value, source=str(path))
    for key in known:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None and key != "data_dir":
            values[key] = _coerce(key, raw, source=ENV_PREFIX + key.upper())
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, source="command line")
    return AgentConfig(data_dir=data_dir, **values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def update_toml(data_dir: Path, **settings: Any) -> Path:
    """Merge settings into `<data_dir>/agent.toml` (flat keys; written atomically)."""
    path = Path(data_dir) / CONFIG_NAME
    current = read_toml(path)
    current.update({k: v for k, v in settings.items() if v is not None})
    lines = ["# edge-agent settings; EDGE_AGENT_<NAME> env vars override them"]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in current.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
