"""Benchmark of the device agent: memory charged to it, idle wakeups, binary size, start-to-ready.

Compared in the same run with the plain-Python agent and a bare Celery solo worker on
Redis (the peer a device would otherwise run). Each worker runs in its own memory cgroup
(cgroup v2 under /sys/fs/cgroup, else the v1 memory hierarchy; skipped with a note if
neither is writable), as a systemd service would, and the bench reports what is charged
to it: RSS and PSS (/proc/PID/smaps_rollup), the cgroup's anon, file (page cache),
shmem (tmpfs) and peak. Targets: RSS <= 40 MiB, binary <= 20 MB, frozen ready <= 0.4 s,
<= 5 wakeups per 30 s idle. Everything runs on 127.0.0.1 and is cleaned up.

Run: .venv/bin/python bench/agent.py [--idle 30] [--starts 3] [--compare-onefile PATH]
[--compare-binary PATH]
(--compare-onefile: also run a PyInstaller one-file build with TMPDIR on a tmpfs, the
layout before the launcher, to show what its unpacking costs. --compare-binary: also run
another build of dist/edge-agent, e.g. one made in a checkout of main, interleaved with
this one, so a change's effect on start-up is measured under the same load.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _harness import ROOT, IngestSink, start_redis  # first: puts the repository root on sys.path

from agent.cli import main as agent_main
from coordinator.broker import LoopbackBroker
from ledger.processes import ChildProcess
from security import pki
from security.pki import LoopbackPKI

MiB = 1024 * 1024
TARGETS = {"rss_mib": 40.0, "binary_mb": 20.0, "ready_s": 0.4, "wakeups_30s": 5.0}


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


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) spent so far by the tree: every live process, plus the
    children each has reaped (the launcher's find/stat/sort before it execs the agent).

    Why next to the wall time: eight processes share two cores here, so start-to-ready
    wall time swings with the load; the CPU time to ready is the part the agent costs."""
    ticks = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


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


def smaps_rollup_kib(pid: int) -> dict[str, int]:
    """Pss, Pss_Anon, Pss_File, Pss_Shmem, Rss of one process (kernel >= 4.14), in KiB."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
    return out


class MemCgroup:
    """A memory cgroup of our own for one worker (what systemd gives a service).

    cgroup v2 (a child of the unified root with the memory controller) if we may create one,
    else a child of our cgroup in the v1 memory hierarchy. `None` from create() when neither."""

    def __init__(self, path: Path, v2: bool) -> None:
        self.path, self.v2 = path, v2

    @classmethod
    def create(cls, name: str) -> MemCgroup | None:
        candidates: list[tuple[Path, bool]] = []
        unified = Path("/sys/fs/cgroup")
        if "memory" in _read(unified / "cgroup.controllers").split():
            candidates.append((unified, True))
        for line in _read(Path("/proc/self/cgroup")).splitlines():
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                candidates.append((Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), False))
        for base, v2 in candidates:
            path = base / f"{name}-{os.getpid()}"
            try:
                path.mkdir()
            except OSError:
                continue
            probe = path / ("memory.current" if v2 else "memory.usage_in_bytes")
            if probe.exists():
                return cls(path, v2)
            path.rmdir()
        return None

    def join(self) -> None:
        """preexec_fn: move the child into the cgroup before it execs."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def stats(self) -> dict[str, float]:
        """MiB charged: usage, peak, anon, file (page cache), shmem (tmpfs), file_mapped."""
        raw = dict(line.split() for line in _read(self.path / "memory.stat").splitlines() if line.strip())
        num = {k: int(v) for k, v in raw.items() if v.isdigit()}
        if self.v2:
            usage = int(_read(self.path / "memory.current") or 0)
            peak = int(_read(self.path / "memory.peak") or usage)
            vals = {"anon": num.get("anon", 0), "file": num.get("file", 0), "shmem": num.get("shmem", 0),
                    "file_mapped": num.get("file_mapped", 0)}
        else:
            usage = int(_read(self.path / "memory.usage_in_bytes") or 0)
            peak = int(_read(self.path / "memory.max_usage_in_bytes") or usage)
            # v1 counts shmem inside cache; report page cache without it
            vals = {"anon": num.get("rss", 0), "file": num.get("cache", 0) - num.get("shmem", 0),
                    "shmem": num.get("shmem", 0), "file_mapped": num.get("mapped_file", 0)}
        return {"usage": usage / MiB, "peak": peak / MiB, **{k: v / MiB for k, v in vals.items()}}

    def remove(self) -> None:
        try:
            self.path.rmdir()  # charges left (page cache) move to the parent
        except OSError as exc:
            say(f"could not remove cgroup {self.path}: {exc}")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class Child(ChildProcess):
    """A measured worker: started in its cgroup (if any), start-to-ready timed from its log."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], ready_text: str, log: Path,
                 cgroup: MemCgroup | None = None) -> None:
        super().__init__(name, cmd, log, env={**os.environ, **env}, cwd=ROOT,
                         preexec=cgroup.join if cgroup else None)
        self.ready_text, self.cgroup = ready_text, cgroup
        self.ready_s = float("nan")
        self.readies: list[float] = []
        self.cpus: list[float] = []  # CPU seconds (user + system) of the tree at ready

    def start(self, timeout: float = 60.0) -> Child:
        started = time.monotonic()
        super().start()
        self.wait_for_log(self.ready_text, timeout, poll=0.002)  # fine-grained: start-to-ready is measured
        self.ready_s = time.monotonic() - started
        self.readies.append(self.ready_s)
        pid = self.pid
        if pid is not None:
            self.cpus.append(cpu_seconds(pid))
        return self

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
        super().stop(timeout, sig)

    def memory(self) -> dict[str, float]:
        """Worker RSS/anon/file, tree RSS and PSS (split), cgroup charges; MiB."""
        assert self.pid is not None
        main_rss, tree_rss, anon, filed = rss_kib(self.pid)
        pss: dict[str, int] = {}
        for p in tree(self.pid):
            for k, v in smaps_rollup_kib(p).items():
                pss[k] = pss.get(k, 0) + v
        out = {"rss": main_rss / 1024, "tree": tree_rss / 1024, "rss_anon": anon / 1024, "rss_file": filed / 1024,
               "pss": pss.get("Pss", 0) / 1024, "pss_anon": pss.get("Pss_Anon", 0) / 1024,
               "pss_file": pss.get("Pss_File", 0) / 1024, "pss_shmem": pss.get("Pss_Shmem", 0) / 1024}
        if self.cgroup:
            out.update({f"cg_{k}": v for k, v in self.cgroup.stats().items()})
        return out


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
                                  "celery.backends.rpc, security.signing_setup"),
    ("+ agent + kombu_mqtt", "import kombu, paho.mqtt.client, celery.worker, celery.apps.worker, "
                             "celery.backends.rpc, security.signing_setup, kombu_mqtt.transport, agent.app"),
]


LAYERS.append(("  same, agent.lazy deferrals on", "from agent.lazy import defer_unused; defer_unused(); "
                + LAYERS[-1][1]))


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


def enrol(fleet: LoopbackPKI, data_dir: Path, agent_id: str) -> Path:
    """`edge-agent keygen`, the CA signs the CSR, `edge-agent enroll`: as an operator would."""
    if agent_main(["--data-dir", str(data_dir), "keygen", "--id", agent_id]) != 0:
        raise SystemExit(f"edge-agent keygen failed for {agent_id}")
    cert = data_dir.parent / f"{agent_id}-issued.pem"
    pki.write_pem(fleet.ca.issue(pki.load_csr(data_dir / "agent.csr")), cert)
    if agent_main(["--data-dir", str(data_dir), "enroll", "--cert", str(cert), "--ca", str(fleet.ca_path)]) != 0:
        raise SystemExit(f"edge-agent enroll failed for {agent_id}")
    return data_dir


def mount_tmpfs(path: Path) -> bool:
    """TMPDIR on a tmpfs, as on a device whose /tmp is RAM (needs root; False if not possible)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0700", "bench-agent-tmp", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        say(f"no tmpfs ({proc.stderr.strip()}): the one-file comparison is skipped")
    return proc.returncode == 0


def fmt(v: float) -> str:
    return "-" if v != v else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=30.0, help="idle window for wakeups (seconds)")
    parser.add_argument("--keepalive", type=int, default=60, help="agent broker_heartbeat (MQTT keepalive)")
    parser.add_argument("--starts", type=int, default=3, help="starts per variant (best and median reported)")
    parser.add_argument("--compare-onefile", type=Path, default=None,
                        help="a PyInstaller one-file build of the agent to run with TMPDIR on a tmpfs")
    parser.add_argument("--compare-binary", type=Path, default=None,
                        help="another build of dist/edge-agent (e.g. from main) to start interleaved with this one")
    parser.add_argument("--no-layers", action="store_true", help="skip the import layer table")
    args = parser.parse_args(argv)

    say("building (or reusing) dist/edge-agent ...")
    sys.path.insert(0, str(ROOT / "packaging"))
    from build_agent import build  # type: ignore[import-not-found]

    t = time.monotonic()
    binary = build()
    say(f"binary ready ({time.monotonic() - t:.0f}s)")
    binary_mb = binary.stat().st_size / 1e6
    load = os.getloadavg()
    say(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores, shared machine)")

    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    children: list = []
    cgroups: list[MemCgroup] = []
    broker = redis = None
    tmpfs = work / "tmpfs"
    mounted = False
    rows: list[tuple[str, list[float], dict[str, float], float]] = []
    cpus: dict[str, list[float]] = {}
    layers: list[tuple[str, float]] = []

    def cgroup(name: str) -> MemCgroup | None:
        cg = MemCgroup.create(f"bench-agent-{name}")
        if cg:
            cgroups.append(cg)
        return cg

    try:
        say("starting mosquitto (mutual TLS), redis-server, the signed receiver ...")
        fleet = LoopbackPKI.create(work / "pki")
        broker = LoopbackBroker(workdir=work / "mosquitto", pki=fleet).start()
        redis, redis_url = start_redis()
        sink = IngestSink(broker.tls_url, fleet.ssl_options("bench-sink")).start()
        children.append(sink)

        # Plain-python runs use cached bytecode as an installed package would (pip compiles
        # .pyc files): a private cache dir, written by the first start. With
        # PYTHONDONTWRITEBYTECODE set and no __pycache__ in the tree, every start would
        # compile agent/, security/ and kombu_mqtt/ from source (~1 MiB kept by the heap).
        pyc = {"PYTHONPYCACHEPREFIX": str(work / "pycache"), "PYTHONDONTWRITEBYTECODE": ""}
        env = {"EDGE_AGENT_BROKER_HEARTBEAT": str(args.keepalive), "PYTHONUNBUFFERED": "1"}
        runtime = work / "state" / "runtime"  # on disk, as /var/lib/edge-agent/runtime on a device
        frozen_env = {**env, "EDGE_AGENT_RUNTIME_DIR": str(runtime)}
        plain_dir = enrol(fleet, work / "plain", "bench-plain")
        frozen_dir = enrol(fleet, work / "frozen", "bench-frozen")
        (work / "peer").mkdir()
        (work / "peer" / "peerapp.py").write_text(textwrap.dedent(PEER_APP.format(url=redis_url)))

        def agent_cmd(head: list[str], data: Path) -> list[str]:
            return head + ["--data-dir", str(data), "run", "--broker-url", broker.tls_url, "--interval", "3600"]

        # The frozen agent's first start on a device unpacks the bundle: measured alone, in its own
        # cgroup, to show what the unpack charges (page cache of the written files, no shmem).
        first = Child("agent (frozen) 1st start", agent_cmd([str(binary)], frozen_dir), frozen_env, "ready in",
                      work / "frozen-first.log", cgroup("frozen-first"))
        say("first start of the frozen agent (unpacks to the runtime dir on disk) ...")
        first.start()
        time.sleep(3.0)
        first_mem = first.memory()
        first.stop()

        runs = [
            Child("agent (python)", agent_cmd([sys.executable, "-m", "agent"], plain_dir), {**env, **pyc}, "ready in",
                  work / "plain.log", cgroup("python")),
            Child("agent (frozen)", agent_cmd([str(binary)], frozen_dir), frozen_env, "ready in",
                  work / "frozen.log", cgroup("frozen")),
        ]
        if args.compare_binary:
            other = Child("frozen, --compare-binary", agent_cmd([str(args.compare_binary.resolve())],
                                                               enrol(fleet, work / "other", "bench-other")),
                          {**env, "EDGE_AGENT_RUNTIME_DIR": str(work / "state-other" / "runtime")}, "ready in",
                          work / "other.log", cgroup("other"))
            children.append(other)  # stopped in `finally` even if its first start times out
            say("first start of --compare-binary (unpacks; not counted) ...")
            other.start()
            other.stop()
            other.readies.clear()
            other.cpus.clear()
            runs.append(other)
        if args.compare_onefile:
            mounted = mount_tmpfs(tmpfs)
            if mounted:
                onefile_dir = enrol(fleet, work / "onefile", "bench-onefile")
                runs.append(Child("one-file, TMPDIR tmpfs", agent_cmd([str(args.compare_onefile)], onefile_dir),
                                  {**env, "TMPDIR": str(tmpfs)}, "ready in", work / "onefile.log", cgroup("onefile")))
        runs.append(Child("celery solo on redis", [sys.executable, "-m", "celery", "-A", "peerapp", "worker", "-P",
                                                   "solo", "-c", "1", "--without-gossip", "--without-mingle",
                                                   "--without-heartbeat", "-l", "INFO"],
                          {"PYTHONPATH": str(work / "peer"), "PYTHONUNBUFFERED": "1", **pyc}, "ready.",
                          work / "peer.log", cgroup("peer")))
        if not cgroups:
            say("no writable memory cgroup (v2 or v1): cgroup columns are left out")
        # Starts go round-robin (one worker starting at a time, the others idle), so that the
        # shared machine's load swings hit every variant alike instead of one variant's block.
        children.extend(runs)
        for r in range(args.starts):
            say(f"start round {r + 1}/{args.starts} (load {os.getloadavg()[0]:.2f}) ...")
            for child in runs:
                child.stop()
                child.start()
        time.sleep(3.0)  # let the initial sample flush and caches settle
        say(f"idle window {args.idle:.0f}s: counting context switches of all at once ...")
        before = {c.name: switches(c.pid or 0) for c in runs}
        time.sleep(args.idle)
        after = {c.name: switches(c.pid or 0) for c in runs}
        for c in runs:
            wake = (after[c.name] - before[c.name]) * 30.0 / args.idle
            rows.append((c.name, c.readies, c.memory(), wake))
        rows.insert(1, (first.name, first.readies, first_mem, float("nan")))
        cpus = {c.name: c.cpus for c in [first, *runs]}
        if not args.no_layers:
            layers = layer_rss(pyc)
    finally:
        for c in reversed(children):
            c.stop()
        if redis is not None:
            redis.stop()
        if broker is not None:
            broker.stop()
        if mounted:
            subprocess.run(["umount", str(tmpfs)], check=False)
        for cg in cgroups:
            cg.remove()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print("start-to-ready (s) and memory (MiB) of each worker; cg_* = charged to its own cgroup")
    head = (f"{'variant':26} {'best':>6} {'median':>6} {'RSS':>6} {'anon':>6} {'file':>6} {'PSS':>6} {'tree':>6} "
            f"{'cg use':>7} {'cg anon':>7} {'cg file':>7} {'shmem':>6} {'peak':>6} {'wake/30s':>8}")
    print(head)
    for name, readies, m, wake in rows:
        best = min(readies) if readies else float("nan")
        med = statistics.median(readies) if readies else float("nan")
        print(f"{name:26} {best:6.3f} {med:6.3f} {m['rss']:6.1f} {m['rss_anon']:6.1f} {m['rss_file']:6.1f} "
              f"{m['pss']:6.1f} {m['tree']:6.1f} {fmt(m.get('cg_usage', float('nan'))):>7} "
              f"{fmt(m.get('cg_anon', float('nan'))):>7} {fmt(m.get('cg_file', float('nan'))):>7} "
              f"{fmt(m.get('cg_shmem', float('nan'))):>6} {fmt(m.get('cg_peak', float('nan'))):>6} {fmt(wake):>8}")
    print("  (RSS/anon/file: the worker process; PSS and tree: the whole process tree; cg file = page cache")
    print("   charged to the cgroup, reclaimable; shmem = tmpfs pages, not reclaimable without swap; file pages")
    print("   already cached by an earlier reader stay charged to that reader's cgroup)")
    print(f"starts per variant: {args.starts}; load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    print()
    print("CPU time to ready (s, user + system of the process tree; steadier than wall time under load)")
    for name, values in cpus.items():
        if values:
            print(f"  {name:26} best {min(values):.3f}  median {statistics.median(values):.3f}  "
                  f"all {' '.join(f'{v:.3f}' for v in values)}")
    print()
    by = {r[0]: r for r in rows}
    peer = by["celery solo on redis"]
    for name in ("agent (python)", "agent (frozen)"):
        _, readies, m, wake = by[name]
        print(f"{name}: ready x{min(readies) / min(peer[1]):.2f}, RSS x{m['rss'] / peer[2]['rss']:.2f}, "
              f"wakeups x{wake / max(peer[3], 1e-9):.2f} vs celery solo on redis")
    print(f"binary dist/edge-agent: {binary_mb:.1f} MB")
    if layers:
        print()
        print("memory by layer (RSS after imports, plain python):")
        for label, mib in layers:
            print(f"  {label:44} {mib:6.1f} MiB")
    print()
    py, fz = by["agent (python)"], by["agent (frozen)"]
    checks = [
        ("RSS <= 40 MiB (python)", py[2]["rss"] <= TARGETS["rss_mib"], f"{py[2]['rss']:.1f}"),
        ("RSS <= 40 MiB (frozen)", fz[2]["rss"] <= TARGETS["rss_mib"], f"{fz[2]['rss']:.1f}"),
        ("binary <= 20 MB", binary_mb <= TARGETS["binary_mb"], f"{binary_mb:.1f}"),
        ("ready <= 0.4 s (frozen, best)", min(fz[1]) <= TARGETS["ready_s"], f"{min(fz[1]):.3f}"),
        ("ready <= 0.4 s (frozen, median)", statistics.median(fz[1]) <= TARGETS["ready_s"],
         f"{statistics.median(fz[1]):.3f}"),
        ("no tmpfs for the unpack (frozen shmem)", fz[2].get("cg_shmem", 0.0) < 1.0,
         fmt(fz[2].get("cg_shmem", float("nan")))),
        ("wakeups <= 5/30s (python)", py[3] <= TARGETS["wakeups_30s"], f"{py[3]:.1f}"),
        ("wakeups <= 5/30s (frozen)", fz[3] <= TARGETS["wakeups_30s"], f"{fz[3]:.1f}"),
    ]
    for label, ok, value in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {label}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
