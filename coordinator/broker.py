"""The managed Mosquitto: config rendering (security's renderer) and its process.

Why: when no external broker is configured, `run` starts one on loopback with mutual
TLS, the fleet CRL and the queue limits DESIGN.md says matter (Mosquitto drops
messages above `max_queued_messages`; persistence keeps queued tasks across a
broker restart). SIGHUP makes Mosquitto re-read its config and CRL after `revoke`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
