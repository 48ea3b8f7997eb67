"""The managed Mosquitto: config rendering (security's renderer) and its process.

Why: when no external broker is configured, `run` starts one on loopback with mutual
TLS, the fleet CRL and the queue limits that keep tasks from being lost (Mosquitto drops
messages above `max_queued_messages`; persistence keeps queued tasks across a
broker restart; docs/ARCHITECTURE.md, "The managed broker"). SIGHUP makes Mosquitto re-read its config and CRL after `revoke`.
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from ledger.processes import ChildProcess, ProcessStartError, free_port
from security.pki import LoopbackPKI

from .config import CoordinatorConfig
from .errors import CoordinatorError
from .fleet_pki import FleetStore
from .supervisor import Child

CANDIDATES = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next((p for p in CANDIDATES if os.path.exists(p)), None)
    if not found:
        raise CoordinatorError("mosquitto is not installed: run `make setup` (apt-get install mosquitto) or set broker.url")
    return found


def render_config(cfg: CoordinatorConfig, store: FleetStore, workdir: Path) -> str:
    """Mosquitto config (and its ACL in `workdir`) from security's renderer."""
    from security.mosquitto_conf import render_for_coordinator

    return render_for_coordinator(cfg, store, workdir)


def running_broker_pid(cfg: CoordinatorConfig) -> int | None:
    """Pid of this data dir's managed Mosquitto, if it runs (pid file + its command line)."""
    workdir = cfg.run_dir / "mosquitto"
    try:
        pid = int((workdir / "mosquitto.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"mosquitto" in cmdline and str(workdir / "mosquitto.conf").encode() in cmdline else None


def managed_broker(cfg: CoordinatorConfig, store: FleetStore) -> Child:
    workdir = cfg.run_dir / "mosquitto"
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(render_config(cfg, store, workdir))
    return Child(
        name="mosquitto",
        argv=[mosquitto_binary(), "-c", str(conf)],
        log_path=workdir / "mosquitto.log",
        pid_file=workdir / "mosquitto.pid",
        port=cfg.broker.port,
    )


def start_mosquitto(conf: Path, workdir: Path, ports: tuple[int, ...], timeout: float = 10.0) -> ChildProcess:
    """`mosquitto -c conf` (a ChildProcess logging to workdir/mosquitto.log), once its ports listen.

    Raises CoordinatorError with the broker's log when it exits or a port does not open in time.
    """
    child = ChildProcess("mosquitto", [mosquitto_binary(), "-c", str(conf)], workdir / "mosquitto.log")
    try:
        child.start()
        for port in ports:
            child.wait_for_port(port, timeout)
    except ProcessStartError as exc:
        child.stop()
        raise CoordinatorError(f"mosquitto did not start: {exc}; log:\n{child.log()}") from None
    return child


@dataclass
class LoopbackBroker:
    """A Mosquitto with a plain and a mutual-TLS listener on 127.0.0.1, no ACL, no persistence.

    Why beside the managed broker: the transport's tests and benchmarks need the bare
    broker (anonymous plain MQTT next to TLS) that no fleet should run; the coordinator's
    own broker is `managed_broker`.
    """

    workdir: Path
    pki: LoopbackPKI
    plain_port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    extra_config: str = ""
    process: ChildProcess | None = None

    @property
    def plain_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.plain_port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def render_config(self) -> str:
        user = "user root\n" if os.geteuid() == 0 else ""
        return (
            f"{user}"
            "per_listener_settings false\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 0\n"
            "max_packet_size 1048576\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            f"listener {self.plain_port} 127.0.0.1\n"
            f"listener {self.tls_port} 127.0.0.1\n"
            f"cafile {self.pki.ca_path}\n"
            f"certfile {self.pki.server_cert}\n"
            f"keyfile {self.pki.server_key}\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
            "tls_version tlsv1.2\n"
            f"{self.extra_config}"
        )

    def start(self) -> LoopbackBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.render_config())
        self.process = start_mosquitto(conf, self.workdir, (self.plain_port, self.tls_port))
        return self

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.stop(sig=sig)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
