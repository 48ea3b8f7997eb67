"""Mosquitto config + ACL for the fleet: mutual TLS, CRL, per-agent topic ACLs.

Why: the broker is the first door. An agent (certificate CN = agent id, used as the
MQTT username) may only read its own queue, and only publish tasks to the
coordinator's ingest queue plus results to rpc:// reply topics. The coordinator
identities get everything. Topic names follow docs/INTERFACES.md (kombu_mqtt).

Mosquitto 2.0's acl_file does not check SUBSCRIBE (any filter is granted); it checks
every delivery ('read') and every PUBLISH ('write'). So a foreign subscription
receives nothing, and a foreign publish gets PUBACK 0x87 and is dropped. A foreign
member of a shared-subscription group still takes its turn in the group's
round-robin (that copy is then dropped): availability, not confidentiality; see
security/README.md "Known limits". acl_mode="dynsec" (security.dynsec) closes that: the
dynamic-security plugin checks SUBSCRIBE, share group included.

API for the coordinator's supervisor:
    conf_text, acl_text = render_mosquitto_config(settings, acl_path)
    conf_path = write_mosquitto_files(settings, directory)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .pki import validate_identity

ACL_FILE = "acl"
DYNSEC_FILE = "dynamic-security.json"
CONF_FILE = "mosquitto.conf"


class MosquittoConfigError(ValueError):
    """A setting cannot be rendered; the message says which and how to fix it."""


def escape_level(name: str) -> str:
    """kombu_mqtt's escaping of a name used as one topic level (docs/INTERFACES.md)."""
    return (
        name.replace("%", "%25").replace("/", "%2F").replace("+", "%2B").replace("#", "%23").replace("$", "%24")
    )


@dataclass
class MosquittoSettings:
    """Everything the broker needs; the defaults are why tasks are not lost (docs/ARCHITECTURE.md, "The managed broker")."""

    cafile: Path
    certfile: Path
    keyfile: Path
    crlfile: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8883
    coordinator_identities: tuple[str, ...] = ("coordinator",)
    topic_prefix: str = "kombu"
    ingest_queue: str = "edge.ingest"
    agent_queue_prefix: str = "agent."
    reply_exchange: str = "c.rep"  # celery rpc:// results
    persistence: bool = True
    persistence_location: Path | None = None
    autosave_interval: int = 1
    max_queued_messages: int = 1_000_000  # Mosquitto's default 1000 silently DROPS the excess
    max_queued_bytes: int = 0
    max_inflight_messages: int = 0
    max_packet_size: int = 1_048_576
    persistent_client_expiration: str | None = None  # e.g. "14d"; MQTT 5 session expiry applies anyway
    tls_version: str = "tlsv1.2"
    run_as_root: bool | None = None  # None: decide from the current euid ("user root" is needed as root)
    log_dest: str = "stderr"
    log_types: tuple[str, ...] = ("error", "warning", "notice")
    extra_listeners: tuple[tuple[str, int], ...] = field(default=())  # more (host, port) with the same TLS
    extra_config: str = ""
    # "dynsec" (default): dynamic-security plugin, one role per agent in `agent_ids`
    # (SUBSCRIBE and shared-subscription groups checked; agents enrolled later are added
    # at runtime with security.dynsec.add_agent_commands + send_commands; removal cuts
    # the live connection).
    # "file": UNSAFE for fleets, kept for brokers without the plugin: Mosquitto acl_file
    # with %u patterns never checks SUBSCRIBE (any agent can join the coordinator's or
    # another agent's $share group and drop its messages) and cannot cut a connection.
    acl_mode: str = "dynsec"
    agent_ids: tuple[str, ...] = ()
    dynsec_plugin: Path | None = None  # default: found in the usual library folders

    def validate(self) -> None:
        if not (0 < int(self.port) < 65536):
            raise MosquittoConfigError(f"broker port {self.port} is out of range 1-65535")
        if self.persistence and self.persistence_location is None:
            raise MosquittoConfigError("persistence is on but persistence_location is not set: give a directory")
        if not self.coordinator_identities:
            raise MosquittoConfigError("at least one coordinator identity is needed for full broker access")
        for name in self.coordinator_identities:
            validate_identity(name)
        for path_name in ("cafile", "certfile", "keyfile"):
            if getattr(self, path_name) is None:
                raise MosquittoConfigError(f"{path_name} is required: mutual TLS is the only listener")
        if self.acl_mode not in ("file", "dynsec"):
            raise MosquittoConfigError(f"acl_mode {self.acl_mode!r} is not 'file' or 'dynsec'")
        for text in (str(self.cafile), str(self.certfile), str(self.keyfile), str(self.crlfile or "")):
            if "\n" in text:
                raise MosquittoConfigError(f"path {text!r} contains a newline")


def render_acl(settings: MosquittoSettings) -> str:
    """ACL file text. `pattern` lines apply to every client (%u = certificate CN)."""
    p = settings.topic_prefix
    own = f"{settings.agent_queue_prefix}%u"
    ingest = escape_level(settings.ingest_queue)
    reply = escape_level(settings.reply_exchange)
    lines = [
        "# Generated by edgeledger security.mosquitto_config: edit the settings, not this file.",
        "# Every certificate (an agent): read its own queue only (direct exchange + default exchange).",
        f"pattern read {p}/d/{own}/{own}",
        f"pattern read {p}/d/amq.default/{own}",
        "# ... publish tasks into the coordinator's ingest queue only,",
        f"pattern write {p}/d/{ingest}/{ingest}",
        f"pattern write {p}/d/amq.default/{ingest}",
        "# ... and results of the commands it ran to rpc:// reply topics (results are signed).",
        f"pattern write {p}/d/{reply}/+",
        "# No pidbox (remote control), no events, no other queue: agents run with those off.",
        "",
    ]
    for name in settings.coordinator_identities:
        lines += [f"user {name}", "topic readwrite #", ""]
    return "\n".join(lines)


def render_dynsec(settings: MosquittoSettings) -> str:
    """The dynamic-security plugin's JSON state for acl_mode='dynsec'."""
    from .dynsec import render_dynsec_config

    doc = render_dynsec_config(
        settings.agent_ids, settings.coordinator_identities, prefix=settings.topic_prefix,
        queue_prefix=settings.agent_queue_prefix, ingest=escape_level(settings.ingest_queue),
        reply=escape_level(settings.reply_exchange),
    )
    return json.dumps(doc, indent=2) + "\n"


def render_mosquitto_config(settings: MosquittoSettings, acl_path: Path | str) -> tuple[str, str]:
    """(mosquitto.conf text, ACL text); the conf points at `acl_path`.

    acl_mode='dynsec': the second text is the plugin's JSON and `acl_path` its file.
    """
    settings.validate()
    root = settings.run_as_root if settings.run_as_root is not None else os.geteuid() == 0
    out = ["# Generated by edgeledger security.mosquitto_config: edit the settings, not this file."]
    if root:
        out.append("user root")
    out += [
        "per_listener_settings false",
        "allow_anonymous false",
    ]
    if settings.acl_mode == "dynsec":
        from .dynsec import find_plugin

        out += [f"plugin {settings.dynsec_plugin or find_plugin()}", f"plugin_opt_config_file {acl_path}"]
    else:
        out.append(f"acl_file {acl_path}")
    if settings.persistence:
        location = str(settings.persistence_location).rstrip("/") + "/"
        out += ["persistence true", f"persistence_location {location}", f"autosave_interval {settings.autosave_interval}"]
    else:
        out.append("persistence false")
    out += [
        f"max_queued_messages {settings.max_queued_messages}",
        f"max_queued_bytes {settings.max_queued_bytes}",
        f"max_inflight_messages {settings.max_inflight_messages}",
        f"max_packet_size {settings.max_packet_size}",
    ]
    if settings.persistent_client_expiration:
        out.append(f"persistent_client_expiration {settings.persistent_client_expiration}")
    out.append(f"log_dest {settings.log_dest}")
    out += [f"log_type {t}" for t in settings.log_types]
    for host, port in ((settings.host, settings.port), *settings.extra_listeners):
        out.append(f"listener {int(port)} {host}")
    out += [
        f"cafile {settings.cafile}",
        f"certfile {settings.certfile}",
        f"keyfile {settings.keyfile}",
    ]
    if settings.crlfile:
        out.append(f"crlfile {settings.crlfile}")
    out += [
        "require_certificate true",
        "use_identity_as_username true",
        f"tls_version {settings.tls_version}",
    ]
    if settings.extra_config:
        out.append(settings.extra_config.rstrip("\n"))
    return "\n".join(out) + "\n", (render_dynsec(settings) if settings.acl_mode == "dynsec" else render_acl(settings))


def write_mosquitto_files(settings: MosquittoSettings, directory: Path | str) -> Path:
    """Write mosquitto.conf + acl into `directory` (persistence defaults inside it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if settings.persistence and settings.persistence_location is None:
        settings.persistence_location = directory
    if settings.persistence_location is not None:
        Path(settings.persistence_location).mkdir(parents=True, exist_ok=True)
    acl_path = directory / (DYNSEC_FILE if settings.acl_mode == "dynsec" else ACL_FILE)
    conf_text, acl_text = render_mosquitto_config(settings, acl_path)
    acl_path.write_text(acl_text)
    conf_path = directory / CONF_FILE
    conf_path.write_text(conf_text)
    return conf_path
