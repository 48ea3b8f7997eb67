"""Adapter for coordinator/broker.py's hook `render_for_coordinator(cfg, store, workdir)`.

Why: the coordinator's supervisor looks for this function to render its managed
broker's config. It maps the coordinator's settings (duck-typed: security must not
import coordinator) onto `MosquittoSettings`, writes the ACL next to the config and
returns the config text. Everything else lives in `security.mosquitto_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .mosquitto_config import ACL_FILE, DYNSEC_FILE, MosquittoSettings, render_mosquitto_config


def settings_for_coordinator(cfg: Any, store: Any, workdir: Path) -> MosquittoSettings:
    broker = cfg.broker
    acl_mode = getattr(broker, "acl_mode", "dynsec")
    agent_ids: tuple[str, ...] = ()
    if acl_mode == "dynsec":  # agents enrolled later: security.dynsec.add_agent_commands at enrol time
        agent_ids = tuple(sorted({c.name for c in store.issued() if not store.is_revoked(c.name)}))
    return MosquittoSettings(
        cafile=Path(cfg.ca_path),
        certfile=Path(store.broker_cert),
        keyfile=Path(store.broker_key),
        crlfile=Path(cfg.crl_path) if getattr(cfg, "crl_path", None) else None,
        host=broker.host,
        port=int(broker.port),
        coordinator_identities=tuple(getattr(cfg, "coordinator_identities", (cfg.identity,))),
        persistence=True,
        persistence_location=Path(workdir),
        max_queued_messages=int(getattr(broker, "max_queued_messages", 1_000_000)),
        autosave_interval=int(getattr(broker, "autosave_interval", 10)),
        acl_mode=acl_mode,
        agent_ids=agent_ids,
    )


def render_for_coordinator(cfg: Any, store: Any, workdir: Path) -> str:
    """Write the ACL (or dynsec JSON) into `workdir`; return the mosquitto.conf text."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = settings_for_coordinator(cfg, store, workdir)
    acl_path = workdir / (DYNSEC_FILE if settings.acl_mode == "dynsec" else ACL_FILE)
    conf_text, acl_text = render_mosquitto_config(settings, acl_path)
    acl_path.write_text(acl_text)
    return conf_text
