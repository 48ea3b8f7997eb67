"""The fleet under attack: a real `edge-coordinator run` (dynsec broker, anvil, ingest
worker) and a real victim `edge-agent run`, plus the read-only views the red-team
assertions need (quarantine rows, journal rows per agent, /metrics counters).

Why one fleet for the whole suite: starting a coordinator (Mosquitto + anvil + contract
+ worker) is the expensive part; attacks that would spoil it for others (revocations)
use identities of their own, and every assertion is keyed by the attack's own task id
or by deltas, never by absolute counts of a shared table.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from security.quarantine import Quarantine, QuarantinedMessage
from tests.agent.support import Proc, kill_group
from tests.coordinator.support import ROOT, CoordinatorProcess, cli, wait_until
from tests.support.prom import sample

from .attacker import Attacker, Bundle, Client, connect

ATTACKER, VICTIM = "ra", "rb"
REVOKED_LIVE, REVOKED_ETA = "rc", "rd"  # identities the revocation attacks burn
AGENTS = (ATTACKER, VICTIM, REVOKED_LIVE, REVOKED_ETA)
VICTIM_INTERVAL = 0.3
AGENT_ENV = {"EDGE_AGENT_BACKOFF_MIN": "0.1", "EDGE_AGENT_BACKOFF_MAX": "1", "EDGE_AGENT_PUBLISH_TIMEOUT": "5",
             "EDGE_AGENT_LOG_LEVEL": "INFO"}


@dataclass
class VictimAgent:
    """A real `edge-agent run` enrolled from its bundle."""

    agent_id: str
    home: Path
    log: Path
    proc: Proc | None = None
    started_with: float = VICTIM_INTERVAL  # `run --interval`: a flag, never written to the stored state

    def enroll(self, bundle: Path) -> VictimAgent:
        out = subprocess.run([sys.executable, "-m", "agent.cli", "--data-dir", str(self.home), "enroll", "--bundle",
                              str(bundle)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return self

    def start(self, interval: float = VICTIM_INTERVAL) -> VictimAgent:
        cmd = [sys.executable, "-m", "agent.cli", "--data-dir", str(self.home), "run", "--interval", str(interval)]
        self.started_with = interval
        self.proc = Proc(cmd, self.log, env=AGENT_ENV).start()
        self.proc.wait_for_output("ready in", timeout=120)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.proc is not None:
            kill_group(self.proc.proc)
        self.proc = None

    def _outbox(self, sql: str) -> list[tuple]:
        path = self.home / "outbox.sqlite3"
        if not path.exists():
            return []
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute(sql).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            db.close()

    def next_seq(self) -> int:
        """The seq the victim's next reading will get (its outbox meta)."""
        rows = self._outbox("SELECT value FROM meta WHERE key = 'next_seq'")
        return int(rows[0][0]) if rows else 1

    def stored_interval(self) -> float | None:
        """The sampling interval the victim keeps: the one a set_interval command stored, else
        the one it was started with (a flag beats the stored state and is not written there)."""
        rows = self._outbox("SELECT value FROM meta WHERE key = 'interval'")
        return float(rows[0][0]) if rows else self.started_with


@dataclass
class Fleet:
    coordinator: CoordinatorProcess
    victim: VictimAgent
    workdir: Path
    clients: list[Client] = field(default_factory=list)

    # -- identities -----------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.coordinator.data_dir

    @property
    def port(self) -> int:
        return self.coordinator.broker_port

    def bundle(self, agent_id: str) -> Bundle:
        return Bundle.load(self.coordinator.bundle(agent_id))

    def attacker(self, agent_id: str = ATTACKER) -> Attacker:
        return Attacker(self.bundle(agent_id), self.port)

    def observer(self) -> Client:
        """A connection with the coordinator's own identity: the test's eyes on the broker."""
        pki = self.data_dir / "pki"
        client = connect(self.port, pki / "ca.pem", pki / "coordinator.pem", pki / "coordinator.key")
        self.clients.append(client)
        return client

    # -- what happened ----------------------------------------------------------
    def quarantine(self) -> Quarantine:
        return Quarantine(self.data_dir / "quarantine.sqlite")

    def quarantined(self, task_id: str) -> list[QuarantinedMessage]:
        return [r for r in self.quarantine().rows() if r.task_id == task_id]

    def quarantined_body(self, marker: bytes, since_id: int = 0) -> list[QuarantinedMessage]:
        return [r for r in self.quarantine().rows() if r.id > since_id and marker in r.body]

    def last_quarantine_id(self) -> int:
        rows = self.quarantine().rows()
        return rows[-1].id if rows else 0

    def executions(self, task_id: str) -> list[tuple[str, str]]:
        """(status, agent_id) journal rows for one task id."""
        return self.coordinator.query("SELECT status, agent_id FROM executions WHERE task_id = ?", (task_id,))

    def readings_below(self, agent_id: str, seq: int) -> int:
        return self.coordinator.query("SELECT COUNT(*) FROM readings WHERE agent_id = ? AND seq < ?",
                                      (agent_id, seq))[0][0]

    def reading_owner(self, task_id: str) -> list[tuple[str, int]]:
        return self.coordinator.query("SELECT agent_id, seq FROM readings WHERE task_id = ?", (task_id,))

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the coordinator's /metrics; every series exists from start, so an
        absent one is a wrong name or label, never a zero."""
        value = sample(self.coordinator.metrics(), name, **labels)
        assert value is not None, f"/metrics has no sample {name}{labels}"
        return value

    def refusals(self, reason: str) -> float:
        return self.metric("edgeledger_signing_refusals_total", reason=reason)

    # -- victim health ---------------------------------------------------------------
    def victim_lossless(self, since: int = 1, timeout: float = 60) -> int:
        """Every reading the victim made from seq `since` up to now reaches the journal:
        the exact count of seqs since..n-1 (n = its next seq now) is stored under its id."""
        upto = self.victim.next_seq()
        assert upto > since, f"the victim has made no reading since seq {since}"

        def stored() -> int:
            return self.readings_below(self.victim.agent_id, upto) - self.readings_below(self.victim.agent_id, since)

        wait_until(lambda: stored() == upto - since, timeout,
                   f"all {upto - since} readings of {self.victim.agent_id} from seq {since} journaled")
        return upto - since

    def send(self, agent_id: str, task: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return cli("send", "--data-dir", str(self.data_dir), agent_id, task, *args, "--timeout", str(timeout), "--json",
                   timeout=timeout + 60)

    def status_of(self, agent_id: str) -> dict[str, Any]:
        out = self.send(agent_id, "status")
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert reply["status"] == "SUCCESS", reply
        return reply["result"]

    def close(self) -> None:
        for client in self.clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - teardown must reach the processes below
                pass
        self.victim.stop()
        self.coordinator.cleanup()


def start_fleet(workdir: Path) -> Fleet:
    coord = CoordinatorProcess(workdir / "coord")
    out = cli("init", "--data-dir", str(coord.data_dir), "--broker-port", str(coord.broker_port), "--chain-port",
              str(coord.chain_port), "--http-port", str(coord.http_port), "--acl-mode", "dynsec")
    assert out.returncode == 0, out.stderr
    for name in AGENTS:
        out = cli("enroll", "--data-dir", str(coord.data_dir), "--bundle", name)
        assert out.returncode == 0, out.stderr
    victim = VictimAgent(VICTIM, workdir / "victim-home", workdir / "victim.log")
    fleet = Fleet(coordinator=coord, victim=victim, workdir=workdir)
    try:
        coord.start(timeout=180)
        victim.enroll(coord.bundle(VICTIM)).start()
        wait_until(lambda: coord.query("SELECT COUNT(*) FROM readings WHERE agent_id = ?", (VICTIM,)) >= [(2,)],
                   120, "the victim's first readings journaled")
    except BaseException:
        fleet.close()
        raise
    return fleet


def settle(fleet: Fleet, predicate: Any, timeout: float, what: str) -> Any:
    """wait_until with the coordinator's log tail in the failure message."""
    try:
        return wait_until(predicate, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- coordinator log tail ---\n{fleet.coordinator.log()[-2500:]}") from None


def now() -> float:
    return time.time()


def signed_content(raw: bytes) -> dict | None:
    """The signed payload inside a quarantined body, whether the row kept the envelope
    itself or the whole kombu message around it; None when it holds neither."""
    import base64

    from security.envelope import signed_payload

    candidates = [raw]
    try:
        candidates.append(base64.b64decode(json.loads(raw)["body"]))
    except (ValueError, KeyError, TypeError):
        pass
    for candidate in candidates:
        try:
            return signed_payload(candidate)
        except Exception:  # noqa: BLE001 - not an envelope: try the next reading of it
            continue
    return None
