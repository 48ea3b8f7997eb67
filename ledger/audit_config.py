"""edge-audit configuration: one typed place, merged from TOML file < env vars < CLI flags.

The journal's own ledger_config (written by the chain writer) fills in the RPC URL,
contract address and recorder list when none are given, so `edge-audit --journal X
verify` works on a coordinator host with no other settings.

TOML (file given by --config or EDGE_AUDIT_CONFIG), all keys optional:
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
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV = {"journal": "EDGE_AUDIT_JOURNAL", "rpc_url": "EDGE_AUDIT_RPC_URL", "contract": "EDGE_AUDIT_CONTRACT",
       "config": "EDGE_AUDIT_CONFIG", "log_key": "EDGE_AUDIT_LOG_KEY"}


class ConfigError(ValueError):
    """The audit configuration is incomplete or unreadable."""


@dataclass
class AuditConfig:
    journal: Path | None = None
    rpc_url: str | None = None
    contract: str | None = None
    recorders: list[str] = field(default_factory=list)
    from_block: int = 0
    log_chunk: int = 5000
    log_key: str | None = None

    @classmethod
    def load(cls, cli: dict[str, Any], environ: dict[str, str] | None = None) -> AuditConfig:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        config_file = cli.get("config") or env.get(ENV["config"])
        if config_file:
            path = Path(config_file)
            try:
                values.update(tomllib.loads(path.read_text()))
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist: fix --config / {ENV['config']}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for name in ("journal", "rpc_url", "contract", "log_key"):
            if env.get(ENV[name]):
                values[name] = env[ENV[name]]
        for name in ("journal", "rpc_url", "contract", "from_block", "log_chunk", "log_key"):
            if cli.get(name) is not None:
                values[name] = cli[name]
        recorders = list(values.get("recorders", [])) + list(cli.get("recorders") or [])
        unknown = set(values) - {"journal", "rpc_url", "contract", "recorders", "from_block", "log_chunk", "log_key"}
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}: see `edge-audit --help`")
        try:
            return cls(journal=Path(values["journal"]) if values.get("journal") else None,
                       rpc_url=values.get("rpc_url"), contract=values.get("contract"), recorders=recorders,
                       from_block=int(values.get("from_block", 0)), log_chunk=int(values.get("log_chunk", 5000)),
                       log_key=values.get("log_key"))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad config value: {exc}") from None

    def require_journal(self) -> Path:
        if self.journal is None:
            raise ConfigError(f"no journal: pass --journal PATH or set {ENV['journal']}")
        if not self.journal.exists():
            raise ConfigError(f"journal {self.journal} does not exist: check --journal / {ENV['journal']}")
        return self.journal
