"""What several benchmarks start around the code they measure: redis, a Celery peer
worker over kombu_mqtt, a sink for the agents' readings, a coordinator with enrolled agents.

Why here and not in tests/: a benchmark depends on the product packages only (the
processes, the broker and the fleet CA are theirs: ledger.processes,
coordinator.broker.LoopbackBroker, security.pki.LoopbackPKI); what remains is glue
that only benchmarks need.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# `python bench/x.py` puts bench/ first on sys.path, where bench/ledger.py would shadow the
# ledger package: the repository root goes first (import _harness before any product package).
sys.path.insert(0, str(ROOT))

from ledger.processes import ChildProcess, ProcessStartError, free_port  # noqa: E402
from ledger.sqlite_files import read_only  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")

CELERY = str(Path(sys.executable).with_name("celery"))


def start_redis(workdir: Path | None = None, timeout: float = 15.0) -> tuple[ChildProcess, str]:
    """A throwaway redis-server on a free loopback port (no persistence): (process, redis:// url)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if workdir is not None:
        argv += ["--dir", str(workdir)]
    child = ChildProcess("redis-server", argv, fix="apt-get install redis-server (make setup does it)")
    child.start().wait_for_port(port, timeout)
    return child, f"redis://127.0.0.1:{port}/0"


def peer_env(broker_url: str, ssl_options: dict[str, str] | None, queue: str, client_id: str | None = None) -> dict[str, str]:
    """Environment for a `celery -A _peer_app worker` (see bench/_peer_app.py)."""
    env = dict(os.environ, PEER_BROKER_URL=broker_url, PEER_QUEUE=queue, PYTHONPATH=str(BENCH))
    for key in ("PEER_CA", "PEER_CERT", "PEER_KEY", "PEER_CLIENT_ID"):
        env.pop(key, None)
    if ssl_options:
        env.update(PEER_CA=ssl_options["ca_certs"], PEER_CERT=ssl_options["certfile"], PEER_KEY=ssl_options["keyfile"])
    if client_id:
        env["PEER_CLIENT_ID"] = client_id
    return env


def peer_worker(env: dict[str, str], log_path: Path) -> ChildProcess:
    """`celery -A _peer_app worker -P solo -c 1` (not started): the stock worker a device would run."""
    argv = [CELERY, "-A", "_peer_app", "worker", "-P", "solo", "-c", "1", "--prefetch-multiplier", "1", "-l", "info",
            "--without-heartbeat", "--without-gossip", "--without-mingle"]
    return ChildProcess("celery peer worker", argv, log_path, env=env, cwd=BENCH)


class IngestSink:
    """Consumes and acks every message on the ingest queue, without decoding it.

    Why: agents need a consumer on `edge.ingest` (a publish nobody subscribes to is
    refused with PUBACK 0x10 and retried), but an agent benchmark measures the agent, not
    the coordinator. A thread in the benchmark's own process keeps the broker's queue empty.
    """

    def __init__(self, broker_url: str, ssl_options: dict[str, str]) -> None:
        self.broker_url, self.ssl_options = broker_url, ssl_options
        self.received = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ingest-sink", daemon=True)

    def start(self, timeout: float = 30.0) -> IngestSink:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"ingest sink did not subscribe within {timeout:g}s: {self._error or 'no answer'}")
        return self

    def _run(self) -> None:
        from kombu import Connection, Consumer, Exchange, Queue

        import kombu_mqtt  # noqa: F401  (registers mqtts://)
        from security.contract import INGEST_QUEUE

        queue = Queue(INGEST_QUEUE, Exchange(INGEST_QUEUE, "direct"), routing_key=INGEST_QUEUE)

        def on_message(message: Any) -> None:  # a kombu Message, not decoded (signed payloads)
            self.received += 1
            message.ack()

        try:
            with Connection(self.broker_url, ssl=self.ssl_options, transport_options={"identity": self.ssl_options["certfile"]}) as conn:
                with Consumer(conn, queues=[queue], on_message=on_message, accept=[]):
                    self._ready.set()
                    while not self._stop.is_set():
                        try:
                            conn.drain_events(timeout=0.5)
                        except TimeoutError:
                            pass
        except Exception as exc:  # noqa: BLE001 - reported by start() or stop()
            self._error = exc
            self._ready.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def start_coordinator(data: Path, log_path: Path, agents: list[str], timeout: float = 90.0) -> tuple[ChildProcess, int]:
    """`edge-coordinator init` + `enroll --bundle` per agent + `run`, on free loopback ports, once /healthz is ok.

    Returns the running daemon and its HTTP port; bundles are in data/bundles/<agent>.
    """
    cli = [sys.executable, "-m", "coordinator.cli"]
    http = free_port()
    subprocess.run([*cli, "init", "--data-dir", str(data), "--broker-port", str(free_port()), "--chain-port",
                    str(free_port()), "--http-port", str(http)], check=True, capture_output=True, cwd=ROOT)
    for name in agents:
        subprocess.run([*cli, "enroll", "--data-dir", str(data), "--bundle", name], check=True, capture_output=True, cwd=ROOT)
    return run_until_healthy("edge-coordinator run", data, http, log_path, timeout), http


def run_until_healthy(name: str, data: Path, http: int, log_path: Path, timeout: float) -> ChildProcess:
    """`edge-coordinator run --data-dir data`, returned once its /healthz on `http` says ok."""
    cli = [sys.executable, "-m", "coordinator.cli"]
    daemon = ChildProcess(name, [*cli, "run", "--data-dir", str(data)], log_path, cwd=ROOT).start()

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=2) as reply:
                return bool(json.loads(reply.read())["ok"])
        except OSError:
            return False

    try:
        daemon.wait_until(healthy, timeout, "a healthy /healthz", poll=0.2)
    except ProcessStartError as exc:
        daemon.kill()
        raise SystemExit(f"bench: {name} did not start ({exc}); see {log_path}") from None
    return daemon


#: anvil's well-known dev accounts #1..#3 (its #0 is the first coordinator's recorder): peers' recorder keys
ANVIL_DEV_KEYS = (
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
)


def start_peer(first: Path, data: Path, name: str, chain_key: str, log_path: Path,
               timeout: float = 90.0) -> ChildProcess:
    """`edge-coordinator peer NAME` from the first coordinator's data dir + `run`: a second ingest
    coordinator on the same broker and chain (its own journal and recorder account)."""
    cli = [sys.executable, "-m", "coordinator.cli"]
    http = free_port()
    subprocess.run([*cli, "peer", name, "--data-dir", str(first), "--out", str(data), "--chain-key", chain_key,
                    "--http-port", str(http)], check=True, capture_output=True, cwd=ROOT)
    return run_until_healthy(f"edge-coordinator run ({name})", data, http, log_path, timeout)


def journal_query(db: Path, sql: str, timeout: float = 30.0) -> list[tuple]:
    """Counts a bench reads from a journal another process writes: read-only, never creates
    the file, and [] while the file or its tables do not exist yet."""
    if not db.exists():
        return []
    try:
        with read_only(db, timeout=timeout) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []


# -- CPU and memory per process, from /proc ------------------------------------------------
def read_proc(pid: int) -> tuple[float, int, str] | None:
    """(cpu seconds, rss bytes, command) of a live pid, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return cpu, rss, cmd
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> list[int]:
    """Every live process below `root` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        for c in children.get(pid, []):
            out.append(c)
            stack.append(c)
    return out


def classify(cmd: str) -> str:
    """The role of a process in the coordinator's tree: broker, anvil or coordinator."""
    if "mosquitto" in cmd.split(" ", 1)[0]:
        return "broker"
    if "anvil" in cmd:
        return "anvil"
    return "coordinator"


class ProcessMeter:
    """CPU% (of one core) and RSS per role between two samples, and CPU seconds per role
    since the first sample. Roles: the coordinator's process tree (`classify`), plus
    `others` (pid -> role). A process that exits between samples loses what it spent
    after its last one: sample often."""

    def __init__(self, coordinator_pid: int | None, others: dict[int, str]) -> None:
        self.coordinator_pid = coordinator_pid
        self.others = others
        self.last: dict[int, tuple[float, float]] = {}
        self.peak_rss: dict[str, int] = {}
        self.cpu_total: dict[str, float] = {}

    def pids(self) -> dict[int, str]:
        roles: dict[int, str] = {}
        if self.coordinator_pid is not None:
            roles[self.coordinator_pid] = "coordinator"
            for pid in descendants(self.coordinator_pid):
                info = read_proc(pid)
                if info:
                    roles[pid] = classify(info[2])
        roles.update(self.others)
        return roles

    def sample(self) -> dict[str, tuple[float, int]]:
        now = time.monotonic()
        out: dict[str, list[float]] = {}
        for pid, role in self.pids().items():
            info = read_proc(pid)
            if info is None:
                continue
            cpu, rss, _ = info
            prev = self.last.get(pid)
            self.last[pid] = (now, cpu)
            pct = 100 * (cpu - prev[1]) / max(1e-6, now - prev[0]) if prev else 0.0
            if prev:
                self.cpu_total[role] = self.cpu_total.get(role, 0.0) + cpu - prev[1]
            acc = out.setdefault(role, [0.0, 0])
            acc[0] += pct
            acc[1] += rss
        result = {role: (v[0], int(v[1])) for role, v in out.items()}
        for role, (_, rss) in result.items():
            self.peak_rss[role] = max(self.peak_rss.get(role, 0), rss)
        return result
