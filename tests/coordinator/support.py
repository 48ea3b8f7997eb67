"""A real `edge-coordinator run` in a subprocess, with its own data dir and free ports.

Why a subprocess: the crash tests SIGKILL it, and the daemon owns signal handlers and
children (Mosquitto, anvil) exactly as in production.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger.sqlite_files import read_only
from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def query_journal(data_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of `sql` on `data_dir`/journal.db, or [] while the file or table does not exist yet
    (tests look at the running daemon's journal with their own SQL, read-only)."""
    path = Path(data_dir) / "journal.db"
    if not path.exists():
        return []
    try:
        with read_only(path) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []


def cli(*argv: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "coordinator.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@dataclass
class CoordinatorProcess:
    data_dir: Path
    broker_port: int = field(default_factory=free_port)
    chain_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    runs: int = 0

    def init(self, *agents: str) -> CoordinatorProcess:
        out = cli("init", "--data-dir", str(self.data_dir), "--broker-port", str(self.broker_port),
                  "--chain-port", str(self.chain_port), "--http-port", str(self.http_port))
        assert out.returncode == 0, out.stderr
        for name in agents:
            out = cli("enroll", "--data-dir", str(self.data_dir), "--bundle", name)
            assert out.returncode == 0, out.stderr
        return self

    def bundle(self, name: str) -> Path:
        return self.data_dir / "bundles" / name

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"coordinator-{self.data_dir.name}.log"

    def start(self, timeout: float = 90) -> CoordinatorProcess:
        self.runs += 1
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([PY, "-m", "coordinator.cli", "run", "--data-dir", str(self.data_dir)], cwd=ROOT,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until(lambda: self.healthy() or self._died(), timeout, "coordinator /healthz ok")
        return self

    def _died(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"coordinator exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as resp:
                return json.loads(resp.read())["ok"]
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"coordinator did not stop within {timeout}s after signal {sig}") from None

    def kill(self) -> None:
        """SIGKILL the daemon only (its Mosquitto lives on, like after a real crash)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def mosquitto_pid(self) -> int | None:
        try:
            return int((self.data_dir / "run" / "mosquitto" / "mosquitto.pid").read_text())
        except (OSError, ValueError):
            return None

    def cleanup(self) -> None:
        """Never leave a daemon, broker or chain behind, whatever the test did."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop(timeout=30)
        except AssertionError:
            pass
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        pid = self.mosquitto_pid()
        if pid:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"mosquitto" in cmd and str(self.data_dir).encode() in cmd:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    # -- journal queries (read-only, while the daemon runs) --
    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return query_journal(self.data_dir, sql, params)

    def readings(self) -> int:
        rows = self.query("SELECT COUNT(*) FROM readings")
        return rows[0][0] if rows else 0

    def anchor_states(self) -> dict[str, int]:
        return dict(self.query("SELECT anchor_state, COUNT(*) FROM executions GROUP BY 1"))

    def all_confirmed(self) -> bool:
        states = self.anchor_states()
        return bool(states) and set(states) == {"confirmed"}


def simagent(bundle: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "coordinator.simagent", "--bundle", str(bundle), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def audit(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGE_AUDIT_PINS": str(data_dir / "audit-pins.json")}  # never the user's pins
    return subprocess.run([PY, "-m", "ledger.audit_cli", "--journal", str(data_dir / "journal.db"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def verified_anchored(data_dir: Path) -> dict:
    """`edge-audit --json verify --require-anchored`: asserts it passed; returns its report."""
    verified = audit(data_dir, "--json", "verify", "--require-anchored", "--quiet")
    report = json.loads(verified.stdout)
    assert verified.returncode == 0 and report["ok"], verified.stdout + verified.stderr
    return report
