"""A real Mosquitto for tests: generated config, TLS listener, free loopback port.

Why not a mock: the transport's behaviour (shared subscriptions, persistent
sessions, PUBACK reason codes, queue limits) is the broker's behaviour.
The broker and its CA are the product's (coordinator.broker.LoopbackBroker,
security.pki.LoopbackPKI), shared with bench/; the names the suites use stay.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.broker import LoopbackBroker, mosquitto_binary, start_mosquitto
from security.pki import LoopbackPKI

FleetPKI = LoopbackPKI
MosquittoBroker = LoopbackBroker
launch_mosquitto = start_mosquitto  # -> ledger.processes.ChildProcess, started and listening

__all__ = ["FleetPKI", "MosquittoBroker", "broker_log", "launch_mosquitto", "mosquitto_binary"]


def broker_log(workdir: Path) -> str:
    path = workdir / "mosquitto.log"
    return path.read_text(errors="replace") if path.exists() else ""
