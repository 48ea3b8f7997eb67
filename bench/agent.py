"""Benchmark of the device agent: idle RSS, idle wakeups, binary size, start-to-ready.

Compared in the same run with a bare Celery solo worker on Redis (the peer a device
would otherwise run). Targets: RSS <= 40 MiB, binary <= 20 MB, ready <= 0.5 s,
<= 5 wakeups per 30 s idle. Everything runs on 127.0.0.1 and is cleaned up.

Run: .venv/bin/python bench/agent.py [--idle 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.agent.support import Receiver, enrolled_agent  # noqa: E402
from tests.support.mosquitto import FleetPKI, MosquittoBroker  # noqa: E402
from tests.support.net import free_port, wait_for_port  # noqa: E402

MiB = 1024 * 1024
TARGETS = {"rss_mib": 40.0, "binary_mb": 20.0, "ready_s": 0.5, "wakeups_30s": 5.0}


def say(msg: str) -> None:
    print(f"[bench/agent {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tree(pid: int) -> list[int]:
    """pid and all its descendants (the one-file binary runs a bootloader + child)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            pass
    return out


def status_field(pid: int, name: str, tid: str | None = None) -> int:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> tuple[int, int, int, int]:
    """RSS of the process doing the work (largest in tree), of the whole tree, and the
    worker's anonymous (private heap) / file-backed (mapped libraries) parts, in KiB."""
    procs = tree(pid)
    values = [status_field(p, "VmRSS") for p in procs]
    worker = procs[values.index(max(values))]
    return max(values), sum(values), status_field(worker, "RssAnon"), status_field(worker, "RssFile")


def switches(pid: int) -> int:
    """Context switches of every thread of every process in the tree (each is a wakeup)."""
    total = 0
    for p in tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            total += status_field(p, "voluntary_ctxt_switches", tid)
            total += status_field(p, "nonvoluntary_ctxt_switches", tid)
    return total


class Child:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], ready_text: str, log: Path) -> None:
        self.name, self.cmd, self.env, self.ready_text, self.log = name, cmd, env, ready_text, log
        self.proc: subprocess.Popen | None = None
        self.ready_s = float("nan")

    def start(self, timeout: float = 60.0) -> "Child":
        out = open(self.log, "wb")
        started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, **self.env}, cwd=ROOT, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.ready_text in self.log.read_text(errors="replace"):
                self.ready_s = time.monotonic() - started
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.002)
        raise RuntimeError(f"{self.name} did not get ready:\n{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


PEER_APP = """
from celery import Celery
app = Celery("peer", broker="{url}")
app.conf.worker_hijack_root_logger = True

@app.task(name="peer.noop")
def noop():
    return None
"""

LAYERS = [
    ("python (empty)", ""),
    ("+ kombu + paho-mqtt", "import kombu, paho.mqtt.client"),
    ("+ celery worker stack", "import kombu, paho.mqtt.client, celery.worker, celery.apps.worker, celery.backends.rpc"),
    ("+ cryptography + security", "import kombu, paho.mqtt.client, celery.worker, celery.apps.worker, "
                                  "celery.backends.rpc, security.celery_signing"),
    ("+ agent + kombu_mqtt", "import kombu, paho.mqtt.client, celery.worker, celery.apps.worker, "
                             "celery.backends.rpc, security.celery_signing, kombu_mqtt.transport, agent.app"),
]


def layer_rss(env: dict[str, str]) -> list[tuple[str, float]]:
    """RSS after imports only; each measured on the second run (bytecode cached by the first)."""
    out = []
    for label, imports in LAYERS:
        code = f"{imports}\nimport re\nprint(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                  env={**os.environ, **env})
        out.append((label, int(proc.stdout.strip()) / 1024))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=30.0, help="idle window for wakeups (seconds)")
    parser.add_argument("--keepalive", type=int, default=60, help="agent broker_heartbeat (MQTT keepalive)")
    args = parser.parse_args(argv)

    say("building (or reusing) dist/edge-agent ...")
    sys.path.insert(0, str(ROOT / "packaging"))
    from build_agent import build  # type: ignore[import-not-found]

    t = time.monotonic()
    binary = build()
    say(f"binary ready ({time.monotonic() - t:.0f}s)")
    binary_mb = binary.stat().st_size / 1e6

    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    children: list = []
    broker = redis = None
    try:
        say("starting mosquitto (mutual TLS), redis-server, the signed receiver ...")
        fleet = FleetPKI.create(work / "pki")
        broker = MosquittoBroker(workdir=work / "mosquitto", pki=fleet).start()
        rport = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        wait_for_port(rport)
        rcv = Receiver(work / "receiver", broker.tls_url, fleet).start()
        children.append(rcv)

        # Plain-python runs use cached bytecode as an installed package would (pip compiles
        # .pyc files): a private cache dir, written by the first of the three starts. With
        # PYTHONDONTWRITEBYTECODE set and no __pycache__ in the tree, every start would
        # compile agent/, security/ and kombu_mqtt/ from source (~1 MiB kept by the heap).
        pyc = {"PYTHONPYCACHEPREFIX": str(work / "pycache"), "PYTHONDONTWRITEBYTECODE": ""}
        env = {"EDGE_AGENT_BROKER_HEARTBEAT": str(args.keepalive), "PYTHONUNBUFFERED": "1"}
        plain_dir = enrolled_agent(fleet, work / "plain", "bench-plain")
        frozen_dir = enrolled_agent(fleet, work / "frozen", "bench-frozen")
        (work / "peer").mkdir()
        (work / "peer" / "peerapp.py").write_text(textwrap.dedent(PEER_APP.format(url=f"redis://127.0.0.1:{rport}/0")))
        runs = [
            Child("agent (python)", [sys.executable, "-m", "agent", "--data-dir", str(plain_dir), "run",
                                     "--broker-url", broker.tls_url, "--interval", "3600"], {**env, **pyc}, "ready in",
                  work / "plain.log"),
            Child("agent (frozen)", [str(binary), "--data-dir", str(frozen_dir), "run",
                                     "--broker-url", broker.tls_url, "--interval", "3600"], env, "ready in",
                  work / "frozen.log"),
            Child("celery solo on redis", [sys.executable, "-m", "celery", "-A", "peerapp", "worker", "-P", "solo",
                                           "-c", "1", "--without-gossip", "--without-mingle", "--without-heartbeat",
                                           "-l", "INFO"],
                  {"PYTHONPATH": str(work / "peer"), "PYTHONUNBUFFERED": "1", **pyc}, "ready.", work / "peer.log"),
        ]
        for child in runs:  # one at a time: start-to-ready is not measured under each other's load
            say(f"starting {child.name} ...")
            for _ in range(3):  # best of 3 starts (the machine is shared)
                child.stop()
                child.start()
                best = child.ready_s
                child.best_ready = min(getattr(child, "best_ready", best), best)  # type: ignore[attr-defined]
            children.append(child)
        time.sleep(3.0)  # let the initial sample flush and caches settle
        say(f"idle window {args.idle:.0f}s: counting context switches of all three at once ...")
        before = {c.name: switches(c.proc.pid) for c in runs}
        time.sleep(args.idle)
        after = {c.name: switches(c.proc.pid) for c in runs}
        rows = []
        for c in runs:
            main_rss, tree_rss, anon, filed = rss_kib(c.proc.pid)
            wake = (after[c.name] - before[c.name]) * 30.0 / args.idle
            rows.append((c.name, c.best_ready, main_rss / 1024, tree_rss / 1024, wake,  # type: ignore[attr-defined]
                         anon / 1024, filed / 1024))
        layers = layer_rss(pyc)
    finally:
        for c in reversed(children):
            c.stop()
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    peer = rows[-1]
    print()
    print(f"{'variant':24} {'ready s':>8} {'RSS MiB':>8} {'anon':>6} {'file':>6} {'tree MiB':>9} {'wakeups/30s':>12}")
    for name, ready, rss, tree_rss, wake, anon, filed in rows:
        print(f"{name:24} {ready:8.3f} {rss:8.1f} {anon:6.1f} {filed:6.1f} {tree_rss:9.1f} {wake:12.1f}")
    print("  (anon = private heap: Python objects, malloc; file = mapped libraries such as libpython,")
    print("   libcrypto and cryptography's Rust extension: clean pages, counted in RSS)")
    print()
    for name, ready, rss, tree_rss, wake, _anon, _file in rows[:2]:
        print(f"{name}: ready x{ready / peer[1]:.2f}, RSS x{rss / peer[2]:.2f}, wakeups x{wake / max(peer[4], 1e-9):.2f} "
              f"vs celery solo on redis")
    print(f"binary dist/edge-agent: {binary_mb:.1f} MB")
    print()
    print("memory by layer (RSS after imports, plain python):")
    for label, mib in layers:
        print(f"  {label:30} {mib:6.1f} MiB")
    print()
    agent_py, agent_fz = rows[0], rows[1]
    checks = [
        ("RSS <= 40 MiB (python)", agent_py[2] <= TARGETS["rss_mib"], f"{agent_py[2]:.1f}"),
        ("RSS <= 40 MiB (frozen)", agent_fz[2] <= TARGETS["rss_mib"], f"{agent_fz[2]:.1f}"),
        ("binary <= 20 MB", binary_mb <= TARGETS["binary_mb"], f"{binary_mb:.1f}"),
        ("ready <= 0.5 s (python)", agent_py[1] <= TARGETS["ready_s"], f"{agent_py[1]:.3f}"),
        ("ready <= 0.5 s (frozen)", agent_fz[1] <= TARGETS["ready_s"], f"{agent_fz[1]:.3f}"),
        ("wakeups <= 5/30s (python)", agent_py[4] <= TARGETS["wakeups_30s"], f"{agent_py[4]:.1f}"),
        ("wakeups <= 5/30s (frozen)", agent_fz[4] <= TARGETS["wakeups_30s"], f"{agent_fz[4]:.1f}"),
    ]
    for label, ok, value in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {label}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
