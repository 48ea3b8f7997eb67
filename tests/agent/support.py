"""Process helpers for the agent tests: an enrolled data dir, the agent, the receiver.

Why subprocesses: the agent is a worker process that gets SIGKILLed in a test; the
receiver is a separate Celery worker. Both run in their own process group, and the
fixtures kill the group whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.cli import main as agent_main
from ledger.processes import ChildProcess, stop_group
from security import pki
from tests.support.mosquitto import FleetPKI, MosquittoBroker

ROOT = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.05, what: str = "") -> object:
    """Poll until predicate() is truthy; raise with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")


def enrolled_agent(test_pki: FleetPKI, data_dir: Path, agent_id: str) -> Path:
    """keygen + CA signs the CSR + enroll, as an operator would (CLI entry point)."""
    assert agent_main(["--data-dir", str(data_dir), "keygen", "--id", agent_id]) == 0
    cert = data_dir.parent / f"{agent_id}-issued.pem"
    pki.write_pem(test_pki.ca.issue(pki.load_csr(data_dir / "agent.csr")), cert)
    assert agent_main(["--data-dir", str(data_dir), "enroll", "--cert", str(cert), "--ca", str(test_pki.ca_path)]) == 0
    return data_dir


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Signal the process group of a child started in its own session; SIGKILL after `timeout`."""
    stop_group(proc, sig, timeout)


class Proc(ChildProcess):
    """A child process in its own group (ledger.processes), its combined output in `log`."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(cmd[0], cmd, log, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=ROOT)
        self.cmd, self.log_file = cmd, log

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.process

    def start(self) -> Proc:
        super().start()
        return self

    def output(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def wait_for_output(self, text: str, timeout: float = 60.0) -> None:
        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[0]} exited {self.proc.returncode} before {text!r}:\n{self.output()[-3000:]}")
            return text in self.output()
        wait_until(seen, timeout, what=f"{text!r} in {self.log_file}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:  # type: ignore[override]
        super().stop(timeout, sig)


def agent_command(data_dir: Path, broker_url: str, interval: float, binary: Path | None = None) -> list[str]:
    head = [str(binary)] if binary else [sys.executable, "-m", "agent"]
    return head + ["--data-dir", str(data_dir), "run", "--broker-url", broker_url, "--interval", str(interval)]


AGENT_TEST_ENV = {"EDGE_AGENT_BACKOFF_MIN": "0.1", "EDGE_AGENT_BACKOFF_MAX": "1", "EDGE_AGENT_PUBLISH_TIMEOUT": "5",
                  "EDGE_AGENT_COMMAND_SIGNERS": "test-operator"}


def start_agent(data_dir: Path, broker_url: str, interval: float, binary: Path | None = None,
                log_name: str = "agent.log", env: dict[str, str] | None = None) -> Proc:
    proc = Proc(agent_command(data_dir, broker_url, interval, binary), data_dir.parent / log_name,
                env={**AGENT_TEST_ENV, **(env or {})}).start()
    proc.wait_for_output("ready in", timeout=90)
    return proc


@dataclass
class Receiver:
    """tests/agent/receiver.py as a subprocess: a signed-task consumer of edge.ingest."""

    workdir: Path
    broker_url: str
    test_pki: FleetPKI
    proc: Proc | None = None

    @property
    def out(self) -> Path:
        return self.workdir / "received.jsonl"

    def start(self) -> Receiver:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cert, key = self.test_pki.client("test-coordinator")
        env = {"RECEIVER_BROKER": self.broker_url, "RECEIVER_OUT": str(self.out), "RECEIVER_CERT": str(cert),
               "RECEIVER_KEY": str(key), "RECEIVER_CA": str(self.test_pki.ca_path), "RECEIVER_STATE": str(self.workdir),
               "RECEIVER_LOGLEVEL": "INFO"}
        self.proc = Proc([sys.executable, "-m", "tests.agent.receiver"], self.workdir / "receiver.log", env=env).start()
        self.proc.wait_for_output("ready.", timeout=90)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def records(self) -> list[dict]:
        if not self.out.exists():
            return []
        lines = self.out.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def refused(self, reason: str) -> int:
        """How many messages the receiver's signature checks refused for `reason`."""
        from security.quarantine import Quarantine

        path = self.workdir / "quarantine.sqlite"
        return Quarantine(path).count(reason) if path.exists() else 0

    def readings(self, agent_id: str) -> list[dict]:
        return [r for r in self.records() if r["task"] == "edge.ingest" and r["kwargs"]["reading"]["agent_id"] == agent_id]


def outbox_state(data_dir: Path) -> dict:
    """Read the agent's outbox from outside (WAL lets us read while it writes).

    `backlog`: rows not yet published. Published readings wait for the coordinator's
    receipt (`unconfirmed`); the stand-in Receiver of these tests sends none."""
    path = data_dir / "outbox.sqlite3"
    if not path.exists():
        return {"backlog": 0, "next_seq": 1}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        backlog = db.execute("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").fetchone()[0]
        unconfirmed = db.execute("SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL").fetchone()[0]
        row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        return {"backlog": backlog, "unconfirmed": unconfirmed, "next_seq": int(row[0]) if row else 1}
    except sqlite3.OperationalError as exc:  # the agent created the file but not yet its tables
        if "no such table" not in str(exc) and "no such column" not in str(exc):
            raise
        return {"backlog": 0, "unconfirmed": 0, "next_seq": 1}
    finally:
        db.close()


def operator_app(test_pki: FleetPKI, workdir: Path, broker_url: str, name: str = "test-operator"):
    """A signing Celery client that sends commands to agents and reads rpc:// results."""
    from celery import Celery

    import kombu_mqtt  # noqa: F401  (registers mqtts://)
    from security.signing_config import SigningConfig
    from security.signing_setup import setup_signing

    cert, key = test_pki.client(name)
    app = Celery("operator", broker=broker_url, backend="rpc://", set_as_current=False)
    app.conf.broker_use_ssl = test_pki.ssl_options(name)
    app.conf.broker_transport_options = {"identity": str(cert)}  # own pooled connections per identity
    setup_signing(app, SigningConfig(key_path=key, cert_path=cert, ca_path=test_pki.ca_path,
                                     replay_db=workdir / f"{name}-replay.sqlite",
                                     quarantine_db=workdir / f"{name}-quarantine.sqlite"))
    return app


def send_command(op, name: str, queue: str, timeout: float = 60.0, **kwargs):
    """Send a command and wait for its result. The first send may find the agent's
    fresh durable subscription not yet confirmed by the broker (PUBACK 0x10): retry."""
    from kombu_mqtt.errors import NoSubscribersError

    deadline = time.monotonic() + timeout
    while True:
        try:
            result = op.send_task(name, kwargs=kwargs, queue=queue, retry=False)
            break
        except NoSubscribersError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return result.get(timeout=timeout)


def make_persistent(broker: MosquittoBroker) -> MosquittoBroker:
    """Restart a test broker with persistence on, as a production broker runs.

    Why: a PUBACK means the broker took the message over. A broker without persistence
    that restarts loses what it had acknowledged but not yet delivered (or not yet
    acked by the receiver); no publisher can prevent that, so outage tests use a
    broker that keeps its messages and sessions across the restart.
    """
    broker.extra_config = f"persistence true\npersistence_location {broker.workdir}/\n"
    broker.restart()
    return broker
