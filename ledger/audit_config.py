"""edge-audit configuration: one typed place, merged by the shared loader (security.settings).

Precedence: flags > environment (EDGE_AUDIT_<KEY>) > TOML file (--config or
EDGE_AUDIT_CONFIG) > the journal's own ledger_config (written by the chain writer: the
stored state that fills in the RPC URL, contract address and recorders when none are
given, so `edge-audit --journal X verify` works on a coordinator host with no other
settings) > defaults. Every key: docs/CONFIG.md.

TOML, all keys optional:
    journal = "/var/lib/edgeledger/journal.db"
    rpc_url = "http://127.0.0.1:8545"
    contract = "0x..."
    recorders = ["0x...", "0x..."]
    from_block = 0
    log_chunk = 5000
    log_key = "/var/lib/edgeledger/pki/log.pub"   # the log's verifier key (vkey file or string)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from security import settings
from security.settings import setting

ENV_PREFIX = "EDGE_AUDIT_"


class ConfigError(ValueError):
    """The audit configuration is incomplete or unreadable."""


@dataclass
class AuditConfig:
    journal: Path | None = setting(None, help="the coordinator's journal SQLite file (read only)")
    rpc_url: str | None = setting(None, prefixes=("http://", "https://"),
                                  help="Ethereum JSON-RPC URL; unset: the journal's")
    contract: str | None = setting(None, help="ExecutionLedger address; unset: the journal's")
    recorders: list[str] = setting(default_factory=list,
                                   help="trust events from these senders too; the journal's recorders are always trusted")
    from_block: int = setting(0, min=0, help="first block scanned by `verify`")
    log_chunk: int = setting(5000, min=1, help="blocks per eth_getLogs request")
    log_key: str | None = setting(None, help="the log's verifier key: a vkey file (pki/log.pub) or string; "
                                             "unset: the journal's, or pki/log.pub next to it")

    @classmethod
    def load(cls, cli: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> AuditConfig:
        """`cli`: flag values by key (None = not given), plus "config" (the TOML file)."""
        env = os.environ if environ is None else environ
        flags = {k: v for k, v in cli.items() if k != "config" and v is not None}
        config_file = cli.get("config") or env.get(ENV["config"])
        values: dict[str, Any] = {}
        origin = ""
        if config_file:
            path = Path(config_file)
            if not path.exists():
                raise ConfigError(f"config file {path} does not exist: fix --config / {ENV['config']}")
            values, origin = _read(path), str(path)
        try:
            resolved = settings.load(FACE, file_values=values, file_origin=origin, env=env, flags=flags)
        except settings.SettingsError as exc:
            raise ConfigError(str(exc)) from None
        return settings.build(cls, resolved.values)

    def require_journal(self) -> Path:
        if self.journal is None:
            raise ConfigError(f"no journal: pass --journal PATH or set {ENV['journal']}")
        if not self.journal.exists():
            raise ConfigError(f"journal {self.journal} does not exist: check --journal / {ENV['journal']}")
        return self.journal


def _read(path: Path) -> dict[str, Any]:
    try:
        return settings.read_toml(path, "fix the file given by --config / " + ENV_PREFIX + "CONFIG")
    except settings.SettingsError as exc:
        raise ConfigError(str(exc)) from None


FACE = settings.Face(
    tool="edge-audit",
    env_prefix=ENV_PREFIX,
    schema=AuditConfig,
    file="given by `--config FILE` or `EDGE_AUDIT_CONFIG` (no default file)",
    flags={"journal": "--journal", "rpc_url": "--rpc-url", "contract": "--contract", "recorders": "--recorder",
           "from_block": "--from-block", "log_key": "--log-key"},
    other_env={"EDGE_AUDIT_CONFIG": "the TOML file (like `--config`)",
               "EDGE_AUDIT_PINS": "where `edge-audit` keeps pinned log heads (ledger/pins.py)"},
    notes="Stored state: the journal's own ledger config (written by the coordinator's chain writer) supplies "
          "`rpc_url`, `contract` and the recorders when nothing above sets them. `--data-dir DIR` is `--journal "
          "DIR/journal.db`.",
)

#: Environment variable names by key (help texts and messages).
ENV = {spec.key: spec.env for spec in FACE.specs()} | {"config": ENV_PREFIX + "CONFIG"}
