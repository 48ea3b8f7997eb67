"""The coordinator's configuration, in one typed place.

Why: every face reads the same settings from one file (`coordinator.toml` in the data
directory, written by `edge-coordinator init`) and lets the environment override any
of them (`EDGE_COORDINATOR_<SECTION>_<FIELD>`, e.g. `EDGE_COORDINATOR_BROKER_URL`), so
tests, the demo and service units need no extra flags. Loading, range checks and the
precedence (flags > environment > coordinator.toml > defaults) are the shared ones of
security.settings; every key is listed in docs/CONFIG.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from security import settings
from security.settings import section, setting
from security.settings_render import dump_toml, to_toml_data, write_toml

from .errors import CoordinatorError

CONFIG_NAME = "coordinator.toml"
ENV_PREFIX = "EDGE_COORDINATOR_"
DEFAULT_DATA_DIR = Path("var/coordinator")
PORT = {"min": 0, "max": 65535}


@dataclass
class BrokerConfig:
    """MQTT broker: managed Mosquitto on loopback unless `url` is set."""

    url: str = setting("", prefixes=("mqtts://", "mqtt://"),
                       help="external broker (mqtts://host:port); empty: run our own Mosquitto")
    host: str = setting("127.0.0.1", non_empty=True, help="address of the managed Mosquitto")
    port: int = setting(8883, **PORT, help="TLS port of the managed Mosquitto")
    max_queued_messages: int = setting(100000, min=0, help="messages Mosquitto queues per offline session (0: no limit)")
    # Mosquitto 2.0 rewrites its whole in-memory store at each autosave: with 60k queued
    # 3 KB tasks that is 267 MB every second at 1 s, 27% of a core even while idle
    # (docs/BENCHMARKS.md "Broker backlog"). A crash loses at most this much of what it
    # queued; agents keep every reading until its receipt and send it again.
    autosave_interval: int = setting(10, min=1, unit="s",
                                     help="seconds between the managed Mosquitto's saves of its queues (crash loss window)")
    # "dynsec" (default): Mosquitto's dynamic-security plugin checks SUBSCRIBE too (no
    # agent can join another queue's $share group), enroll/revoke change rights at
    # runtime and revoke cuts the live connection. "file" is UNSAFE for fleets: acl_file
    # never checks SUBSCRIBE (any agent can drop others' readings) and a revoked agent
    # keeps its live connection; kept only for brokers without the plugin.
    acl_mode: str = setting("dynsec", choices=("dynsec", "file"),
                            help="broker ACLs: dynsec checks subscriptions and cuts revoked agents; file is UNSAFE")
    keepalive: int = setting(60, min=1, max=65535, unit="s", help="MQTT keepalive of the coordinator's connections")
    publish_timeout: float = setting(15.0, min=0, above=True, unit="s", help="seconds a task publish waits for its PUBACK")
    reconnect_timeout: float = setting(60.0, min=0, above=True, unit="s",
                                       help="the daemon retries a dropped broker connection this long before failing")
    command_reconnect_timeout: float = setting(10.0, min=0, above=True, unit="s",
                                               help="the same for one-shot commands (`send`, `revoke`): fail fast")


@dataclass
class ChainConfig:
    """Ethereum JSON-RPC: managed anvil on loopback unless `url` is set."""

    url: str = setting("", prefixes=("http://", "https://"),
                       help="external Ethereum JSON-RPC endpoint; empty: run our own anvil")
    port: int = setting(8545, **PORT, help="port of the managed anvil")
    private_key: str = setting("", help="recorder account key; empty: anvil's first dev account")
    contract_address: str = setting("", help="ExecutionLedger address; empty: deploy once and remember it in the data dir")
    batch_size: int = setting(100, min=1, help="checkpoints per anchoring transaction")
    batch_interval: float = setting(1.0, min=0, above=True, unit="s",
                                    help="longest idle wait between anchoring rounds (a new checkpoint starts one at once)")
    checkpoint_interval: float = setting(1.0, min=0, above=True, unit="s",
                                         help="sign a log checkpoint at least this often when records arrived")
    checkpoint_every: int = setting(256, min=1, help="... and after this many new records")
    snapshot_interval: float = setting(5.0, min=0, above=True, unit="s",
                                       help="seconds between state snapshots of the managed anvil (lost work on a crash)")


@dataclass
class HttpConfig:
    """Metrics (/metrics) and health (/healthz), loopback only."""

    host: str = setting("127.0.0.1", non_empty=True, help="address of /metrics and /healthz")
    port: int = setting(9464, **PORT, help="port of /metrics and /healthz (0: any free port)")


@dataclass
class MonitorConfig:
    """What /healthz, the fleet page and the per-agent metrics judge against."""

    heartbeat_interval: float = setting(300.0, min=0, above=True, unit="s",
                                        help="the agents' heartbeat_interval (agent.toml)")
    missed_heartbeats: float = setting(2.0, min=0, above=True,
                                       help="heartbeat_interval * missed_heartbeats of silence: no longer online")
    anchor_lag_max: float = setting(300.0, min=0, above=True, unit="s",
                                    help="/healthz fails when the oldest unanchored journal row is older")
    journal_probe_timeout: float = setting(2.0, min=0, above=True, unit="s",
                                           help="/healthz: seconds the journal write probe may wait for the lock")


@dataclass
class WorkerConfig:
    """The ingest worker: one queue, acks after the journal commit."""

    queue: str = setting("edge.ingest", non_empty=True, help="the queue agents send readings to")
    # Group commit (coordinator/batch.py): up to batch_size admitted tasks are journaled in
    # one SQLite transaction, flushed when full or batch_wait after the first (at once while
    # batches stay under a tenth of batch_size: a quiet fleet waits for nobody); each message
    # is acked only after that commit. kombu_mqtt keeps prefetch exactly (tests/transport/test_burst.py).
    prefetch: int = setting(100, min=1, help="messages held unacked by the worker (the batch is at most this)")
    batch_size: int = setting(100, min=1, help="tasks journaled per SQLite transaction (at most worker.prefetch)")
    batch_wait: float = setting(0.02, min=0, unit="s",
                                help="under load, a batch that is not full commits this long after its first "
                                     "task (at once while batches stay small)")
    send_timeout: float = setting(30.0, min=0, above=True, unit="s", help="`send` waits this long for a result by default")
    # Celery task events cost ~20% of flood throughput (docs/BENCHMARKS.md, issue #10's
    # section): off unless asked for; Flower and `celery control enable_events` turn them
    # on in the running worker. Worker heartbeats are sent either way.
    task_events: bool = setting(False, help="send Celery task events from start (Flower and `celery control "
                                            "enable_events` turn them on at runtime; they cost throughput)")
    # End-to-end receipts (coordinator/receipts.py): one per agent with news at most every
    # receipt_interval seconds, sooner after receipt_batch new readings.
    receipt_interval: float = setting(6.0, min=0, above=True, unit="s",
                                      help="at most one receipt per agent this often (<= 5 per 30 s)")
    receipt_batch: int = setting(200, min=1, help="... or sooner after this many new readings")


@dataclass
class PkiConfig:
    """Fleet CRL lifetime: agents and Mosquitto refuse a CRL past its next-update.

    `crl_validity` (seconds, default 7 days) is how long each issued CRL stays valid;
    `crl_refresh` (seconds, default 1 day) is how often the running daemon re-issues it
    and pushes it to every agent (`edge.agent.update_crl`). An agent that misses pushes
    for longer than crl_validity refuses coordinator commands until the next push.
    """

    crl_validity: float = setting(7 * 24 * 3600.0, min=0, above=True, unit="s",
                                  help="each issued CRL stays valid this long; agents and Mosquitto refuse it after")
    crl_refresh: float = setting(24 * 3600.0, min=0, above=True, unit="s",
                                 help="`run` re-issues the CRL and pushes it to agents this often (< crl_validity)")


@dataclass
class CoordinatorConfig:
    data_dir: Path = setting(DEFAULT_DATA_DIR, help="data directory: PKI, journal, coordinator.toml, run state")
    identity: str = setting("coordinator", non_empty=True, help="the coordinator's certificate CN")
    # Several ingest processes share the ingest queue (docs/OPERATIONS.md "Several coordinators"):
    # the other coordinators' CNs get the coordinator's broker rights and are never treated as agents.
    peers: list[str] = setting(default_factory=list,
                               help="the other coordinators' certificate CNs (same fleet CA, same broker and chain)")
    log_level: str = setting("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), fold_case=True, help="log level")
    broker: BrokerConfig = section(BrokerConfig, "MQTT broker")
    chain: ChainConfig = section(ChainConfig, "Ethereum JSON-RPC")
    http: HttpConfig = section(HttpConfig, "metrics and health")
    worker: WorkerConfig = section(WorkerConfig, "ingest worker")
    pki: PkiConfig = section(PkiConfig, "fleet CRL")
    monitor: MonitorConfig = section(MonitorConfig, "health judgements")

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
    def coordinator_identities(self) -> tuple[str, ...]:
        """This coordinator's identity first, then its peers': every coordinator certificate of the fleet."""
        return (self.identity, *[p for p in self.peers if p != self.identity])

    @property
    def holds_ca(self) -> bool:
        """False for a peer's data dir (`edge-coordinator peer`): the fleet CA and its registry of
        issued certificates stay with the first coordinator, which alone issues and pushes CRLs."""
        return (self.pki_dir / "issued.json").exists() or not (self.pki_dir / "ca.pem").exists()

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


FACE = settings.Face(
    tool="edge-coordinator",
    env_prefix=ENV_PREFIX,
    schema=CoordinatorConfig,
    file="`<data-dir>/coordinator.toml` (or `--config FILE` / `EDGE_COORDINATOR_CONFIG`), written by `init`",
    flags={"data_dir": "--data-dir", "broker.port": "--broker-port", "chain.port": "--chain-port",
           "http.port": "--http-port", "broker.url": "--broker-url", "chain.url": "--chain-url",
           "broker.acl_mode": "--acl-mode"},
    other_env={"EDGE_COORDINATOR_CONFIG": "the config file (like `--config`)"},
    notes="Flags other than `--data-dir` / `--config` are those of `init`, which writes them into the file.",
)


def load_config(
    path: Path | None = None,
    *,
    data_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    require_file: bool = False,
    flags: Mapping[str, Any] | None = None,
) -> CoordinatorConfig:
    """Defaults < coordinator.toml < environment < flags (explicit data_dir and `flags`).

    The file is found at `path`, else $EDGE_COORDINATOR_CONFIG, else
    `<data_dir>/coordinator.toml`.
    """
    env = os.environ if env is None else env
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    if data_dir is not None:
        given["data_dir"] = data_dir
    try:
        first = settings.load(FACE, env=env, flags=given)  # where is the data dir (and so the file)?
        if path is None and env.get(ENV_PREFIX + "CONFIG"):
            path = Path(env[ENV_PREFIX + "CONFIG"])
        file_path = Path(path) if path is not None else Path(first.values["data_dir"]) / CONFIG_NAME
        if not file_path.exists() and require_file:
            raise CoordinatorError(f"no config at {file_path}: run `edge-coordinator init --data-dir "
                                   f"{first.values['data_dir']}` first")
        values = settings.read_toml(file_path, "fix it or re-run `edge-coordinator init`")
        resolved = settings.load(FACE, file_values=values, file_origin=str(file_path), env=env, flags=given)
    except settings.SettingsError as exc:
        raise CoordinatorError(str(exc)) from None
    cfg = settings.build(CoordinatorConfig, resolved.values)
    validate(cfg)
    return cfg


def validate(cfg: CoordinatorConfig) -> None:
    """Ranges (again, for values set in code) and the checks that involve two keys."""
    try:
        settings.check_instance(FACE, cfg)
    except settings.SettingsError as exc:
        raise CoordinatorError(str(exc)) from None
    if not cfg.pki.crl_refresh < cfg.pki.crl_validity:
        raise CoordinatorError(
            f"pki.crl_refresh ({cfg.pki.crl_refresh:g}s) must be positive and shorter than pki.crl_validity "
            f"({cfg.pki.crl_validity:g}s): agents would see the CRL go stale between pushes"
        )


#: Comments written above a key in coordinator.toml (the choices an operator must get right).
NOTES = {
    "broker.acl_mode": '"dynsec" (default): subscriptions checked, revoke cuts live connections. "file" is UNSAFE: '
                       "SUBSCRIBE unchecked (any agent can drop others' readings), revoked agents stay connected",
    "pki.crl_validity": "seconds each issued CRL stays valid (next-update); agents and Mosquitto refuse it after",
    "pki.crl_refresh": "seconds between CRL re-issue + push to agents by `run` (must be < crl_validity)",
}
HEADER = "edge-coordinator configuration (every key: docs/CONFIG.md); env EDGE_COORDINATOR_<SECTION>_<KEY> overrides"


def render_toml(cfg: CoordinatorConfig) -> str:
    """The config as TOML, every key written so operators can see what to change."""
    return dump_toml(to_toml_data(FACE, cfg), header=HEADER, notes=NOTES)


def save_config(cfg: CoordinatorConfig) -> Path:
    return write_toml(cfg.config_path, to_toml_data(FACE, cfg), header=HEADER, notes=NOTES)
