"""The agent's configuration: one typed dataclass, from `agent.toml` + `EDGE_AGENT_*` env.

Why one place: the CLI, the worker, the sampler and `status` all read the same
settings, and every bad value is reported once, as one line that says how to fix it.
Loading, range checks and the precedence are the shared ones of security.settings
(flags > environment > agent.toml > stored state > defaults; docs/CONFIG.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from security import settings
from security.settings import setting

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
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(ENV_PREFIX + "DATA_DIR") or DEFAULT_DATA_DIR)


@dataclass
class AgentConfig:
    """Everything the agent needs; paths default to fixed names inside `data_dir`."""

    data_dir: Path = setting(DEFAULT_DATA_DIR, file=False,
                             help="state directory: key, certificates, agent.toml, outbox")
    agent_id: str = setting("", help="this agent's id (its certificate's CN); written by `keygen` / `enroll`")
    broker_url: str = setting("", prefixes=("mqtts://", "mqtt://"),
                              help="the fleet broker, mqtts://host:port; written by `enroll`")
    sensors: list[str] = setting(default_factory=lambda: ["simulated"], non_empty=True,
                                 help="sensor drivers to sample (entry points `edgeledger.sensors`)")
    interval: float = setting(60.0, min=0, above=True, unit="s",
                              help="seconds between samples (a `set_interval` command from the coordinator is stored state)")
    heartbeat_interval: float = setting(300.0, min=0, unit="s",
                                        help="seconds between edge.heartbeat messages; 0 turns them off")
    broker_heartbeat: float = setting(60.0, min=1, unit="s",
                                      help="MQTT keepalive: one PINGREQ per interval when idle")
    outbox_max: int = setting(100_000, min=1, help="readings kept while offline; the oldest are dropped beyond")
    flush_batch: int = setting(200, min=1, help="outbox rows read per flush round")
    # A reading leaves the outbox only on the coordinator's signed receipt (it journaled it);
    # one still unconfirmed this many seconds after its publish is sent again (deduped there).
    resend_after: float = setting(60.0, min=0, above=True, unit="s",
                                  help="an unconfirmed reading is sent again this long after its publish; "
                                       "each further re-send of it waits twice as long, up to 16x")
    # Witness (agent/witness.py): a confirmed reading still without an inclusion proof this long
    # after the first receipt whose newer checkpoint must cover it (and over several such
    # receipts) raises a `reading_unproven` alarm. The bound used is at least 2 x resend_after: a restarted
    # coordinator proves a reading again only once the agent re-sent it.
    witness_proof_timeout: float = setting(300.0, min=0, above=True, unit="s",
                                           help="a confirmed reading left unproven this long by receipts whose "
                                                "checkpoint covers it raises a witness alarm; at least 2 x resend_after")
    backoff_min: float = setting(0.5, min=0, above=True, unit="s", help="first retry delay after a failed flush (jittered)")
    backoff_max: float = setting(30.0, min=0, above=True, unit="s", help="longest retry delay (>= backoff_min)")
    publish_timeout: float = setting(10.0, min=0, above=True, unit="s",
                                     help="seconds to wait for a PUBACK; also the transport's reconnect budget")
    rate_limits: dict[str, str] = setting(default_factory=lambda: {"edge.agent.sample_now": "30/m"},
                                          help="Celery rate limit per command task")
    remote_control: bool = setting(False, help="Celery pidbox (inspect/control); the fleet broker ACL denies it to agents")
    signing: bool = setting(True, help="sign tasks and results (security.signing_setup)")
    # Certificate CNs allowed to send commands (the coordinator's identity); [] = any fleet certificate.
    command_signers: list[str] = setting(default_factory=lambda: ["coordinator"],
                                         help="certificate CNs allowed to send commands; [] = any fleet certificate")
    # Witness mode (agent/witness.py) follows ONE coordinator's transparency log; a fleet with several
    # coordinators (each its own log) runs its agents with witness = false (docs/OPERATIONS.md).
    witness: bool = setting(True, help="check receipts' log checkpoints and proofs (one coordinator's log); "
                                       "false: a receipt alone confirms (needed with several command_signers)")
    log_level: str = setting("WARNING", choices=LOG_LEVELS, fold_case=True, help="log level")
    key_file: Path | None = setting(None, help="private key; default `<data_dir>/agent.key`")
    cert_file: Path | None = setting(None, help="this agent's certificate; default `<data_dir>/agent.pem`")
    ca_file: Path | None = setting(None, help="fleet CA certificate; default `<data_dir>/ca.pem`")
    crl_file: Path | None = setting(None, help="fleet CRL; default `<data_dir>/crl.pem`")
    outbox_file: Path | None = setting(None, help="outbox SQLite file; default `<data_dir>/outbox.sqlite3`")
    # Where each value came from (security.settings origins); not a setting.
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

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
        try:
            settings.check_instance(FACE, self)
        except settings.SettingsError as exc:
            raise AgentError(str(exc)) from None
        if self.backoff_max < self.backoff_min:
            raise AgentError("config backoff_max must be >= backoff_min")
        if self.witness and len(set(self.command_signers)) > 1:
            raise AgentError(
                f"witness = true follows one coordinator's log, but command_signers lists {len(set(self.command_signers))} "
                f"coordinators ({', '.join(sorted(set(self.command_signers)))}), each with its own log key: set "
                "witness = false in agent.toml (EDGE_AGENT_WITNESS=false) or keep one command signer")

    def interval_after_stored(self, stored: str | None) -> float:
        """The sampling interval once the stored one (`set_interval`) is layered in.

        Why: flags > environment > agent.toml > stored state > default. A stored interval
        replaces only the default; one set in the file, env or `run --interval` wins."""
        try:
            return float(settings.stored_value(FACE, self.origins, "interval", stored, self.interval,
                                               "stored state (set_interval)"))
        except settings.SettingsError as exc:
            raise AgentError(str(exc)) from None

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

FACE = settings.Face(
    tool="edge-agent",
    env_prefix=ENV_PREFIX,
    schema=AgentConfig,
    file="`<data-dir>/agent.toml` (flat keys, or an `[agent]` table), written by `keygen` and `enroll`",
    flags={"data_dir": "--data-dir", "broker_url": "--broker-url", "interval": "--interval", "log_level": "--log-level"},
    other_env={"EDGE_AGENT_RUNTIME_DIR": "runtime directory of the packaged binary (read by packaging/launcher.sh)"},
    notes="Stored state: `interval` set by the coordinator's `set_interval` command is kept in the outbox "
          "and used at the next start only when no flag, variable or `agent.toml` sets `interval`.",
)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        data = settings.read_toml(path, "fix or delete it")
    except settings.SettingsError as exc:
        raise AgentError(str(exc)) from None
    return data.get("agent", data) if isinstance(data.get("agent"), dict) else data


def load_config(
    data_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the config: defaults < agent.toml < EDGE_AGENT_* < overrides (non-None only).

    The stored interval (set_interval) is layered in later by `interval_after_stored`."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    if data_dir is not None:
        flags["data_dir"] = data_dir
    try:
        # the data dir (where agent.toml is) comes from the flag, else the environment
        first = settings.load(FACE, env=env, flags=flags)
        path = Path(first.values["data_dir"]) / CONFIG_NAME
        resolved = settings.load(FACE, file_values=read_toml(path), file_origin=str(path), env=env, flags=flags)
    except settings.SettingsError as exc:
        raise AgentError(str(exc)) from None
    cfg = settings.build(AgentConfig, resolved.values)
    cfg.origins = resolved.origins
    return cfg


def update_toml(data_dir: Path, **values: Any) -> Path:
    """Merge settings into `<data_dir>/agent.toml` (flat keys; written atomically)."""
    path = Path(data_dir) / CONFIG_NAME
    current = read_toml(path)
    current.update({k: v for k, v in values.items() if v is not None})
    from security.settings_render import write_toml  # not on the run path

    return write_toml(path, current, header="edge-agent settings (docs/CONFIG.md); "
                                                     "EDGE_AGENT_<NAME> env vars and flags override them")
