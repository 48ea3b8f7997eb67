"""A real Mosquitto for tests: generated config, TLS listener, free loopback port.

Why not a mock: the transport's behaviour (shared subscriptions, persistent
sessions, PUBACK reason codes, queue limits) is the broker's behaviour.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from security.pki import CertificateAuthority, issue_identity

from .net import free_port, wait_for_port

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next((p for p in MOSQUITTO_CANDIDATES if os.path.exists(p)), None)
    if not found:
        raise RuntimeError("mosquitto is not installed: apt-get install mosquitto (make setup does it)")
    return found


def launch_mosquitto(conf: Path, workdir: Path, ports: tuple[int, ...], timeout: float = 10.0) -> subprocess.Popen:
    """Start Mosquitto on `conf`, logging to workdir/mosquitto.log, and wait for its ports.

    Raises RuntimeError with the broker's log when a port does not open in time.
    """
    with open(workdir / "mosquitto.log", "ab") as log:
        process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        for port in ports:
            wait_for_port(port, timeout=timeout)
    except TimeoutError:
        stop_process(process)
        raise RuntimeError(f"mosquitto did not start; log:\n{broker_log(workdir)}") from None
    return process


def broker_log(workdir: Path) -> str:
    path = workdir / "mosquitto.log"
    return path.read_text(errors="replace") if path.exists() else ""


def stop_process(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Signal a broker and wait for it (SIGKILL after 10 s)."""
    if process and process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class FleetPKI:
    """A CA with a server certificate for 127.0.0.1 and client certificates on demand."""

    directory: Path
    ca: CertificateAuthority
    server_cert: Path
    server_key: Path

    @classmethod
    def create(cls, directory: Path) -> FleetPKI:
        directory.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority.create("edgeledger test CA")
        ca.save(directory)
        cert, key = issue_identity(ca, directory, "broker", client=False, server=True, hosts=("127.0.0.1", "localhost"))
        return cls(directory=directory, ca=ca, server_cert=cert, server_key=key)

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    def client(self, name: str) -> tuple[Path, Path]:
        """(cert, key) for a client identity, issued once and reused."""
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        if not cert.exists():
            cert, key = issue_identity(self.ca, self.directory, name)
        return cert, key

    def ssl_options(self, name: str) -> dict:
        """kombu `broker_use_ssl` / transport options for a client identity."""
        cert, key = self.client(name)
        return {"ca_certs": str(self.ca_path), "certfile": str(cert), "keyfile": str(key)}


@dataclass
class MosquittoBroker:
    """One Mosquitto process with a plain and a TLS listener on loopback."""

    workdir: Path
    pki: FleetPKI
    plain_port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    extra_config: str = ""
    process: subprocess.Popen | None = None

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

    def start(self) -> MosquittoBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.render_config())
        self.process = launch_mosquitto(conf, self.workdir, (self.plain_port, self.tls_port))
        return self

    def log(self) -> str:
        return broker_log(self.workdir)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.process, sig)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
