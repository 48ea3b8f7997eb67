"""Fleet load harness: N simulated agents, each its own certificate, MQTT connection and seq.

One real coordinator (`edge-coordinator init/run`: managed Mosquitto with mutual TLS
and dynamic security, anvil, ingest worker, receipts) in a temp dir; N agents enrolled
with the coordinator's PKI (coordinator.fleet_pki, in process); W worker processes,
each driving N/W paho-mqtt connections from one selector loop. Every agent publishes
signed `edge.ingest` tasks (bench/fleet_wire.py: Celery + the agent's signing
serializer, so the bytes are what a real agent sends) at --rate readings/s with a
jittered start, subscribes to its own queue and verifies the coordinator's signed
`edge.agent.receipt` messages. Like the agent's outbox, a reading is kept until a
receipt covers it: re-published after a reconnect if it never got its PUBACK, and
again --resend-after seconds after a publish that no receipt confirmed (only while
receipts are quiet, or below the highest confirmed seq), and after the agent backoff when
the PUBACK says nobody subscribes (a restarted broker before the coordinator is back).

Phases: steady (--duration s, a progress line every 10 s: offered and journaled rate,
backlog, CPU%/RSS of broker, coordinator, anvil and harness), then the reconnect storm
(SIGKILL the managed Mosquitto; the coordinator's supervisor restarts it; agents
reconnect with the agent's backoff policy: time until all N are back, peak connects/s;
a probe times a fresh connection's CONNACK every 0.5 s to show the broker's responsiveness),
then --storm-tail s more readings, then a bounded drain. Finally the journal is read
(read-only): every (agent, seq) sent must be journaled exactly once.

    .venv/bin/python bench/fleet.py --agents 1000 --duration 300
    .venv/bin/python bench/fleet.py --agents 50 --duration 30 --storm-tail 20   # quick
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable

from agent.outbox import RESEND_BACKOFF_MAX  # noqa: E402
from bench._harness import ProcessMeter, classify, descendants, journal_query, read_proc  # noqa: E402
from ledger.processes import free_port  # noqa: E402

#: CPU seconds per second one harness process may spend on re-sends (the rest wait a pass)
RESEND_BUDGET = 0.3
#: seconds per loop pass one harness process may spend re-publishing after reconnects
FLUSH_SLICE = 0.02
NO_MATCHING_SUBSCRIBERS = 0x10  # PUBACK reason: the broker kept the message for nobody


# -- the agent's policies (read from the product, so the harness follows it) -----------------
def agent_policy() -> dict[str, float]:
    """Reconnect backoff and re-send delay of a real agent (agent.config defaults)."""
    from agent.config import AgentConfig

    fields = AgentConfig.__dataclass_fields__
    return {name: float(fields[name].default) for name in ("backoff_min", "backoff_max", "resend_after")}  # type: ignore[arg-type]


# =============================================================================================
# worker process: many agents, one selector loop
# =============================================================================================
class SimAgent:
    """One agent's connection, sequence and unconfirmed readings."""

    def __init__(self, index: int, agent_id: str, tls: Any, backoff: Any) -> None:
        self.index = index
        self.agent_id = agent_id
        self.tls = tls
        self.backoff = backoff
        self.client: Any = None
        self.connecting: Future | None = None
        self.ready = False
        self.retry_at = 0.0
        self.seq = 0
        self.readings: dict[int, dict[str, Any]] = {}  # unconfirmed: seq -> reading
        self.acked: dict[int, float] = {}  # seq -> monotonic time of the PUBACK
        self.inflight: dict[int, int] = {}  # mid -> seq
        self.flush: deque[int] = deque()  # seqs to publish again after a reconnect
        self.retry_at_seq: dict[int, float] = {}  # seq -> monotonic time to publish again (PUBACK said nobody has it)
        self.published: set[int] = set()  # seqs published at least once (a repeat is a re-send)
        self.publishes: dict[int, int] = {}  # seq -> times published (the re-send wait doubles per re-send)
        self.upto = 0
        self.held: list[list[int]] = []
        self.max_confirmed = 0  # highest seq any receipt confirmed
        self.last_receipt_at = 0.0  # monotonic
        self.receipts = 0
        self.resent = 0
        self.sock: Any = None  # the socket registered with the selector
        self.refused = False  # CONNACK with a failure code
        self.connected_at = 0.0  # wall time of the last CONNACK
        self.connects = 0
        self.session_started = False

    def confirmed(self, seq: int) -> bool:
        return seq <= self.upto or any(lo <= seq <= hi for lo, hi in self.held)


class Worker:
    def __init__(self, conf: dict[str, Any]) -> None:
        import ssl

        from bench.fleet_wire import Bundle, WireEncoder
        from kombu_mqtt.backoff import Backoff
        from security.contract import agent_queue

        self.conf = conf
        self.host, self.port = conf["host"], conf["port"]
        self.rate = conf["rate"]
        self.resend_after = conf["resend_after"]
        bundles = [Bundle(Path(p)) for p in conf["bundles"]]
        self.encoder = WireEncoder(bundles, Path(conf["scratch"]), conf["prefix"])
        self.agents: list[SimAgent] = []
        for i, b in enumerate(bundles):
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(b.ca))
            ctx.load_cert_chain(str(b.cert), str(b.key))
            self.agents.append(SimAgent(i, b.agent_id, ctx, Backoff(conf["backoff_min"], conf["backoff_max"])))
        prefix = conf["prefix"]
        self.filters = {}
        for a in self.agents:
            q = agent_queue(a.agent_id)
            self.filters[a.agent_id] = [f"$share/{q}/{prefix}/d/{q}/{q}", f"$share/{q}/{prefix}/d/amq.default/{q}"]
        self.sel = selectors.DefaultSelector()
        self.pool = ThreadPoolExecutor(max_workers=conf["connect_threads"])
        self.sending = True
        self.exit = False
        self.mark = math.inf  # wall time of the broker kill (from the orchestrator)
        self.counts = {"sent": 0, "published": 0, "resent": 0, "receipts": 0, "bad_receipts": 0,
                       "puback_no_subscribers": 0, "puback_refused": 0,
                       "connect_fail": 0, "disconnects": 0, "last_seq_sum": 0}
        self.connect_times: list[float] = []
        self.lock = threading.Lock()
        self.due: list[tuple[float, int]] = []
        self.to_flush: deque[SimAgent] = deque()  # reconnected agents with readings to send again
        start = time.monotonic()
        for a in self.agents:
            a.retry_at = start + random.uniform(0, conf["connect_spread"])

    # -- control from the orchestrator (stdin) --
    def read_commands(self) -> None:
        for line in sys.stdin:
            cmd = line.split()
            with self.lock:
                if cmd[:1] == ["stop"]:
                    self.sending = False
                elif cmd[:1] == ["mark"]:
                    self.mark = float(cmd[1])
                elif cmd[:1] == ["exit"]:
                    self.exit = True
        self.exit = True

    # -- connections --
    def _connect(self, a: SimAgent) -> Any:
        """Runs in a pool thread: TCP + TLS handshake + CONNECT (paho blocks for the handshake)."""
        import paho.mqtt.client as paho
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2,
                             client_id=f"edge-agent-{a.agent_id}", protocol=paho.MQTTv5)
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.tls_set_context(a.tls)
        client.user_data_set(a)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # receipts wait on the broker while the agent is away
        client.connect(self.host, self.port, keepalive=60, clean_start=False, properties=props)
        return client

    def _schedule_retry(self, a: SimAgent, now: float) -> None:
        a.retry_at = now + a.backoff.next()

    def _drop(self, a: SimAgent, now: float) -> None:
        if a.client is not None:
            sock, a.sock = a.sock, None
            if sock is not None:
                try:
                    self.sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
                try:
                    sock.close()
                except OSError:
                    pass
            a.client = None
            if a.ready:
                self.counts["disconnects"] += 1
        a.ready = False
        a.inflight.clear()
        self._schedule_retry(a, now)

    def _on_connect(self, client: Any, a: SimAgent, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.counts["connect_fail"] += 1
            a.refused = True
            return
        a.ready = True
        a.connects += 1
        a.connected_at = time.time()
        self.connect_times.append(a.connected_at)
        a.backoff.reset()
        for f in self.filters[a.agent_id]:
            client.subscribe(f, qos=1)
        a.retry_at_seq.clear()
        # never PUBACKed: send (again), from the loop in time slices (there may be thousands)
        a.flush = deque(sorted(s for s in a.readings if s not in a.acked))
        if a.flush:
            self.to_flush.append(a)

    def _on_publish(self, client: Any, a: SimAgent, mid: int, reason_code: Any, properties: Any) -> None:
        seq = a.inflight.pop(mid, None)
        if seq is None or seq not in a.readings:
            return
        code = int(getattr(reason_code, "value", 0) or 0)
        if code == NO_MATCHING_SUBSCRIBERS or code >= 0x80:
            # kombu_mqtt raises NoSubscribersError / PublishRejectedError for a task here, and
            # the agent's flusher retries after its backoff: nobody has this reading
            self.counts["puback_no_subscribers" if code == NO_MATCHING_SUBSCRIBERS else "puback_refused"] += 1
            a.retry_at_seq[seq] = time.monotonic() + a.backoff.next()
            return
        a.acked[seq] = time.monotonic()

    def _on_message(self, client: Any, a: SimAgent, message: Any) -> None:
        from security.signing import SignatureRefused

        try:
            receipt = self.encoder.receipt(message.payload)
        except (SignatureRefused, ValueError, KeyError, TypeError):  # counted, never trusted
            self.counts["bad_receipts"] += 1
            return
        if receipt is None or receipt.get("agent_id") != a.agent_id:
            return
        a.receipts += 1
        self.counts["receipts"] += 1
        a.upto = max(a.upto, int(receipt.get("upto", 0)))
        a.held = [list(r) for r in receipt.get("held") or []]
        a.max_confirmed = max([a.max_confirmed, a.upto, *(int(hi) for _, hi in a.held)])
        a.last_receipt_at = time.monotonic()
        for seq in [s for s in a.readings if a.confirmed(s)]:
            a.readings.pop(seq, None)
            a.acked.pop(seq, None)
            a.retry_at_seq.pop(seq, None)
            a.published.discard(seq)
            a.publishes.pop(seq, None)

    def _publish(self, a: SimAgent, seq: int) -> None:
        reading = a.readings[seq]
        topic, payload = self.encoder.reading(a.agent_id, seq, reading)
        info = a.client.publish(topic, payload, qos=1)
        a.inflight[info.mid] = seq
        a.acked.pop(seq, None)
        self.counts["published"] += 1
        a.publishes[seq] = a.publishes.get(seq, 0) + 1
        if seq in a.published:
            a.resent += 1
            self.counts["resent"] += 1
        a.published.add(seq)

    def resend_due(self, a: SimAgent, now: float, deadline: float) -> bool:
        """agent.outbox.Outbox.pending's rule: a reading PUBACKed `resend_after` ago without
        a receipt (twice as long per earlier re-send, up to RESEND_BACKOFF_MAX x) goes again only if receipts went quiet for `resend_after`, or it lies below
        the highest confirmed seq (lost on the way); re-sending all of a busy coordinator's
        backlog would only deepen it. Stops at `deadline` (False): the rest is due next
        pass, so one process's re-sends never starve its other connections' I/O."""
        for seq, at in list(a.retry_at_seq.items()):
            if now >= at:
                del a.retry_at_seq[seq]
                if seq in a.readings:
                    self._publish(a, seq)
        if not a.retry_at_seq:
            a.backoff.reset()
        quiet = now - a.last_receipt_at >= self.resend_after
        for seq, at in list(a.acked.items()):
            wait = self.resend_after * min(1 << max(a.publishes.get(seq, 1) - 1, 0), RESEND_BACKOFF_MAX)
            if now - at >= wait and (quiet or seq < a.max_confirmed):
                self._publish(a, seq)
                if time.monotonic() > deadline:
                    return False
        return True

    def flush_some(self, deadline: float) -> None:
        """Publish the readings reconnected agents still owe, until `deadline`."""
        while self.to_flush and time.monotonic() < deadline:
            a = self.to_flush[0]
            if not a.ready or not a.flush:
                a.flush.clear()
                self.to_flush.popleft()
                continue
            seq = a.flush.popleft()
            if seq in a.readings and seq not in a.acked:
                self._publish(a, seq)

    # -- loop --
    def new_reading(self, a: SimAgent) -> None:
        a.seq += 1
        a.readings[a.seq] = {"agent_id": a.agent_id, "sensor": "temp", "seq": a.seq,
                             "value": round(20 + 5 * random.random(), 3), "unit": "C", "sampled_at": time.time()}
        self.counts["sent"] += 1
        if a.ready:
            self._publish(a, a.seq)

    def run(self) -> None:
        threading.Thread(target=self.read_commands, daemon=True).start()
        from kombu_mqtt.client import tls_buffered

        period = 1.0 / self.rate
        now = time.monotonic()
        for a in self.agents:
            heapq.heappush(self.due, (now + random.uniform(0, period), a.index))
        last_report = last_misc = now
        resend_from = 0
        while not self.exit:
            now = time.monotonic()
            # connection attempts due / finished
            for a in self.agents:
                if a.connecting is not None and a.connecting.done():
                    fut, a.connecting = a.connecting, None
                    try:
                        a.client = fut.result()
                        a.sock, a.refused = a.client.socket(), False
                        self.sel.register(a.sock, selectors.EVENT_READ, a)
                        if a.client.want_write():
                            a.client.loop_write()
                    except (OSError, ValueError):  # refused, reset, TLS failure, timeout
                        self.counts["connect_fail"] += 1
                        a.client = None
                        self._schedule_retry(a, now)
                elif a.client is None and a.connecting is None and now >= a.retry_at:
                    a.connecting = self.pool.submit(self._connect, a)
            # readings due
            while self.sending and self.due and self.due[0][0] <= now:
                t, i = heapq.heappop(self.due)
                self.new_reading(self.agents[i])
                heapq.heappush(self.due, (t + period, i))
            self.flush_some(now + FLUSH_SLICE)
            timeout = 0.05 if not self.to_flush else 0.0
            if self.sending and self.due:
                timeout = max(0.0, min(timeout, self.due[0][0] - time.monotonic()))
            for key, _ in self.sel.select(timeout):
                a = key.data
                client = a.client
                if client is None:
                    continue
                rc = client.loop_read(1000)
                while rc == 0 and tls_buffered(client.socket()):
                    rc = client.loop_read(1000)
                if rc != 0 or a.refused or (not client.is_connected() and client.socket() is None):
                    self._drop(a, time.monotonic())
            now = time.monotonic()
            for a in self.agents:
                if a.client is not None and a.client.want_write():
                    if a.client.loop_write() != 0:
                        self._drop(a, now)
            if now - last_misc >= 1.0:
                last_misc = now
                for a in self.agents:
                    if a.client is None:
                        continue
                    if a.client.loop_misc() != 0 or (not a.ready and now - a.retry_at > 30):
                        self._drop(a, now)  # keepalive lost, or no CONNACK for 30 s
                deadline = now + RESEND_BUDGET
                n = len(self.agents)
                for k in range(n):  # rotate the start: every agent gets its turn
                    a = self.agents[(resend_from + k) % n]
                    if a.ready and not self.resend_due(a, now, deadline):
                        resend_from = (resend_from + k) % n
                        break
            if now - last_report >= 1.0:
                last_report = now
                self.report()
        self.report(final=True)

    def report(self, final: bool = False) -> None:
        out: dict[str, Any] = dict(self.counts)
        out["t"] = time.time()
        out["connected"] = sum(1 for a in self.agents if a.ready)
        out["back"] = sum(1 for a in self.agents if a.ready and a.connected_at > self.mark)
        out["unconfirmed"] = sum(len(a.readings) for a in self.agents)
        out["connect_times"] = [round(t, 3) for t in self.connect_times]
        self.connect_times = []
        if final:
            out["final"] = {a.agent_id: [a.seq, a.upto, a.receipts, a.resent, a.connects] for a in self.agents}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def worker_main(conf_path: str) -> int:
    conf = json.loads(Path(conf_path).read_text())
    Worker(conf).run()
    return 0


# =============================================================================================
# orchestrator
# =============================================================================================
def thread_waits(pid: int) -> str:
    """What the threads of `pid` wait on in the kernel (/proc wchan), e.g. "poll 3, futex 2":
    tells a process that waits on its sockets from one blocked on a lock."""
    counts: dict[str, int] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return "gone"
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text().strip() or "-"
        except OSError:
            continue
        key = "running" if state == "R" else wchan.replace("do_", "").replace("_wait_queue", "")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def fmt_usage(usage: dict[str, tuple[float, int]]) -> str:
    return ", ".join(f"{role} {cpu:.0f}% {rss / 2**20:.0f}MiB" for role, (cpu, rss) in sorted(usage.items()))


class MachineMeter:
    """Whole-machine CPU split since the last sample (/proc/stat): busy, iowait, idle."""

    def __init__(self) -> None:
        self.last = self._read()

    @staticmethod
    def _read() -> list[int]:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]

    def sample(self) -> str:
        now = self._read()
        d = [b - a for a, b in zip(self.last, now, strict=True)]
        self.last = now
        total = max(1, sum(d))
        idle, iowait = d[3], d[4]
        return f"machine busy {100 * (total - idle - iowait) / total:.0f}% iowait {100 * iowait / total:.0f}%"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


query = journal_query


def journaled(db: Path) -> int:
    rows = query(db, "SELECT COUNT(*) FROM readings WHERE agent_id LIKE 'fleet-%'")
    return rows[0][0] if rows else 0


class WorkerHandle:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.last: dict[str, Any] = {}
        self.connect_times: list[float] = []
        self.final: dict[str, list[int]] | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            self.connect_times.extend(msg.pop("connect_times", []))
            if "final" in msg:
                self.final = msg.pop("final")
            self.last = msg

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass


def total(handles: list[WorkerHandle], key: str) -> int:
    return sum(int(h.last.get(key, 0)) for h in handles)


def start_coordinator(data: Path, base: Path, agents: int) -> tuple[subprocess.Popen, Any]:
    from coordinator.config import load_config
    from coordinator.fleet_pki import FleetStore

    cli = [PY, "-m", "coordinator.cli"]
    http = free_port()
    subprocess.run([*cli, "init", "--data-dir", str(data), "--broker-port", str(free_port()), "--chain-port",
                    str(free_port()), "--http-port", str(http)], check=True, capture_output=True, cwd=ROOT)
    cfg = load_config(None, data_dir=data)
    store = FleetStore(cfg)
    t0 = time.monotonic()
    for i in range(agents):  # the library behind `edge-coordinator enroll --bundle NAME`
        store.make_bundle(f"fleet-{i:05d}", None, cfg.broker_url)
    store.make_bundle(PROBE, None, cfg.broker_url)  # sends no readings: only times CONNACKs
    print(f"  enrolled {agents} agents (own EC P-256 key + certificate each) in {time.monotonic() - t0:.1f}s", flush=True)
    log = open(base / "coordinator.log", "ab")
    daemon = subprocess.Popen([*cli, "run", "--data-dir", str(data)], stdout=log, stderr=subprocess.STDOUT,
                              cwd=ROOT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=2) as r:
                if json.loads(r.read())["ok"]:
                    return daemon, cfg
        except OSError:
            pass
        if time.monotonic() > deadline or daemon.poll() is not None:
            daemon.kill()
            raise SystemExit("fleet: coordinator did not start; see " + str(base / "coordinator.log"))
        time.sleep(0.3)


PROBE = "probe-0"


class BrokerProbe:
    """A fresh TLS connection every 0.5 s, timed to its CONNACK: is the broker responsive
    to a newcomer while the fleet reconnects?"""

    def __init__(self, bundle: Path, host: str, port: int) -> None:
        import ssl

        from bench.fleet_wire import Bundle

        b = Bundle(bundle)
        self.ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(b.ca))
        self.ctx.load_cert_chain(str(b.cert), str(b.key))
        self.host, self.port = host, port
        self.samples: list[tuple[float, float | None]] = []  # (wall time, seconds to CONNACK or None)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def once(self, timeout: float = 5.0) -> float | None:
        import paho.mqtt.client as paho

        got = threading.Event()
        client = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id=f"{PROBE}-{time.time_ns()}",
                             protocol=paho.MQTTv5)
        client.tls_set_context(self.ctx)
        client.on_connect = lambda c, u, f, rc, p: got.set() if not rc.is_failure else None
        start = time.monotonic()
        try:
            client.connect(self.host, self.port, keepalive=10)
            while not got.is_set() and time.monotonic() - start < timeout:
                if client.loop(0.02) != 0:
                    break
        except (OSError, ValueError):
            return None
        finally:
            try:
                client.disconnect()
            except (OSError, ValueError):
                pass
        return time.monotonic() - start if got.is_set() else None

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self.once()))
            self.stop.wait(0.5)

    def summary(self, killed: float, until: float) -> str:
        before = sorted(v for t, v in self.samples if t < killed and v is not None)
        during = [(t, v) for t, v in self.samples if killed <= t <= until]
        ok = sorted(v for _, v in during if v is not None)
        first = min((t - killed for t, v in during if v is not None), default=float("nan"))

        def pct(xs: list[float], q: float) -> float:
            return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3 if xs else float("nan")

        return (f"probe CONNACK before the kill p50 {pct(before, 0.5):.0f} ms; during the storm "
                f"first success {first:.1f}s after the kill, then p50 {pct(ok, 0.5):.0f} ms, max {pct(ok, 1.0):.0f} ms "
                f"({len(ok)}/{len(during)} probes answered)")


def broker_pid(coordinator_pid: int) -> int | None:
    for pid in descendants(coordinator_pid):
        info = read_proc(pid)
        if info and classify(info[2]) == "broker":
            return pid
    return None


def run(args: argparse.Namespace) -> int:
    from kombu_mqtt.options import TransportOptions

    policy = agent_policy()
    if args.resend_after:
        policy["resend_after"] = args.resend_after
    base = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    data = base / "coord"
    daemon = None
    handles: list[WorkerHandle] = []
    print(f"fleet: {args.agents} agents x {args.rate:g} reading/s over mutual TLS, {args.workers} worker processes, "
          f"load average {loadavg()}", flush=True)
    print(f"  agent policy (agent.config defaults, kombu_mqtt.backoff.Backoff): reconnect backoff full jitter "
          f"[0, d], d = {policy['backoff_min']:g}s doubling to a {policy['backoff_max']:g}s cap; "
          f"unconfirmed reading re-sent after {policy['resend_after']:g}s", flush=True)
    try:
        daemon, cfg = start_coordinator(data, base, args.agents)
        journal = cfg.journal_path
        names = [f"fleet-{i:05d}" for i in range(args.agents)]
        per = math.ceil(args.agents / args.workers)
        for w in range(args.workers):
            chunk = names[w * per:(w + 1) * per]
            if not chunk:
                continue
            conf = {"host": cfg.broker.host, "port": cfg.broker.port, "rate": args.rate,
                    "prefix": TransportOptions().topic_prefix,
                    "bundles": [str(data / "bundles" / n) for n in chunk], "scratch": str(base / f"w{w}"),
                    "resend_after": policy["resend_after"], "backoff_min": policy["backoff_min"],
                    "backoff_max": policy["backoff_max"], "connect_threads": args.connect_threads,
                    "connect_spread": min(10.0, len(chunk) / 100.0)}
            path = base / f"w{w}.json"
            path.write_text(json.dumps(conf))
            proc = subprocess.Popen([PY, __file__, "--worker", str(path)], cwd=ROOT, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, start_new_session=True)
            handles.append(WorkerHandle(proc))
        meter = ProcessMeter(daemon.pid, {pid: "harness" for pid in [os.getpid()] + [h.proc.pid for h in handles]})
        meter.sample()
        machine = MachineMeter()

        def progress(t0: float, label: str, last: list[float]) -> None:
            now = time.monotonic()
            sent, stored = total(handles, "sent"), journaled(journal)
            dt = max(1e-6, now - last[0])
            offered, rate = (sent - last[1]) / dt, (stored - last[2]) / dt
            last[:] = [now, sent, stored]
            print(f"  [{label} {now - t0:5.0f}s] connected {total(handles, 'connected')}/{args.agents}, "
                  f"sent {sent} ({offered:.0f}/s), journaled {stored} ({rate:.0f}/s), backlog {max(0, sent - stored)}, "
                  f"receipts {total(handles, 'receipts')}, resent {total(handles, 'resent')}, "
                  f"PUBACK no subscribers {total(handles, 'puback_no_subscribers')}; "
                  f"{fmt_usage(meter.sample())}; {machine.sample()}, load {loadavg()}; "
                  f"coordinator threads: {thread_waits(daemon.pid)}", flush=True)

        # -- steady phase --
        t0 = time.monotonic()
        deadline = t0 + 120
        while total(handles, "connected") < args.agents:
            if time.monotonic() > deadline or any(h.proc.poll() is not None for h in handles):
                raise SystemExit(f"fleet: only {total(handles, 'connected')}/{args.agents} agents connected")
            time.sleep(0.2)
        print(f"  all {args.agents} connected after {time.monotonic() - t0:.1f}s", flush=True)
        meter.sample()
        meter.cpu_total.clear()
        steady_machine = MachineMeter()
        t0 = time.monotonic()
        last = [t0, total(handles, "sent"), journaled(journal)]
        steady_start = (t0, last[1], last[2])
        while time.monotonic() - t0 < args.duration:
            time.sleep(min(10.0, args.duration - (time.monotonic() - t0)) if args.duration > 0 else 0)
            progress(t0, "steady", last)
        steady: dict[str, Any] = {"seconds": time.monotonic() - steady_start[0], "sent": total(handles, "sent") - steady_start[1],
                  "journaled": journaled(journal) - steady_start[2], "backlog": total(handles, "sent") - journaled(journal),
                  "usage": meter.sample(), "load": loadavg(), "machine": steady_machine.sample()}
        steady_cpu = dict(meter.cpu_total)
        # -- reconnect storm --
        storm: dict[str, Any] = {}
        if args.storm:
            pid = broker_pid(daemon.pid)
            if pid is None:
                raise SystemExit("fleet: cannot find the coordinator's managed mosquitto")
            probe = BrokerProbe(data / "bundles" / PROBE, cfg.broker.host, cfg.broker.port)
            probe.thread.start()
            time.sleep(3)  # a baseline before the kill
            for h in handles:
                h.connect_times.clear()
            killed = time.time()
            for h in handles:
                h.send(f"mark {killed}")
            os.kill(pid, signal.SIGKILL)
            print(f"  storm: SIGKILL mosquitto pid {pid}; the coordinator's supervisor restarts it", flush=True)
            t1 = time.monotonic()
            last = [t1, total(handles, "sent"), journaled(journal)]
            next_line = t1 + 5
            while total(handles, "back") < args.agents:
                if time.monotonic() - t1 > args.storm_timeout:
                    print(f"  storm: only {total(handles, 'back')}/{args.agents} back after {args.storm_timeout:g}s", flush=True)
                    break
                if time.monotonic() >= next_line:
                    next_line += 5
                    progress(t1, "storm", last)
                time.sleep(0.1)
            back_at = max((t for h in handles for t in h.connect_times), default=killed)
            times = sorted(t for h in handles for t in h.connect_times if t > killed)
            per_second: dict[int, int] = {}
            for t in times:
                per_second[int(t - killed)] = per_second.get(int(t - killed), 0) + 1
            time.sleep(2)
            probe.stop.set()
            probe.thread.join(timeout=10)
            new_pid = broker_pid(daemon.pid)
            storm = {"all_back_s": back_at - killed, "back": total(handles, "back"), "reconnects": len(times),
                     "first_s": (times[0] - killed) if times else float("nan"),
                     "peak_per_s": max(per_second.values(), default=0),
                     "peak_at_s": max(per_second, key=lambda k: per_second[k]) if per_second else 0,
                     "connect_fail": total(handles, "connect_fail"), "new_broker_pid": new_pid,
                     "probe": probe.summary(killed, time.time())}
            print(f"  storm: {storm['back']}/{args.agents} back {storm['all_back_s']:.1f}s after the kill "
                  f"(first reconnect at {storm['first_s']:.1f}s), peak {storm['peak_per_s']} connects/s "
                  f"(second {storm['peak_at_s']}), failed attempts {storm['connect_fail']}", flush=True)
            print(f"  storm: {storm['probe']}", flush=True)
            t2 = time.monotonic()
            last = [t2, total(handles, "sent"), journaled(journal)]
            while time.monotonic() - t2 < args.storm_tail:
                time.sleep(min(10.0, max(0.0, args.storm_tail - (time.monotonic() - t2))))
                progress(t2, "after", last)
        # -- drain: stop new readings, wait until everything sent is journaled and receipted --
        for h in handles:
            h.send("stop")
        time.sleep(1.5)
        sent = total(handles, "sent")
        t3 = time.monotonic()
        last = [t3, sent, journaled(journal)]
        next_line = t3 + 10
        while time.monotonic() - t3 < args.drain_timeout:
            if journaled(journal) >= sent and total(handles, "unconfirmed") == 0:
                break
            if time.monotonic() >= next_line:
                next_line += 10
                progress(t3, "drain", last)
                print(f"    unconfirmed (no receipt yet) {total(handles, 'unconfirmed')}", flush=True)
            time.sleep(0.5)
        drain_s = time.monotonic() - t3
        for h in handles:
            h.send("exit")
        for h in handles:
            h.proc.wait(timeout=60)
            h.thread.join(timeout=10)
        final: dict[str, list[int]] = {}
        for h in handles:
            final.update(h.final or {})
        cpu_all = dict(meter.cpu_total)
        # -- verify against the journal (read-only) --
        rows = query(journal, "SELECT agent_id, seq, COUNT(*) FROM readings WHERE agent_id LIKE 'fleet-%' GROUP BY agent_id, seq")
        execs = query(journal, "SELECT COUNT(*), COUNT(DISTINCT task_id) FROM executions WHERE task_name = 'edge.ingest'")
        got = {(a, s): n for a, s, n in rows}
        expected = {(a, s) for a, v in final.items() for s in range(1, v[0] + 1)}
        missing = expected - set(got)
        dupes = sum(1 for n in got.values() if n > 1)
        extra = set(got) - expected
        receipts = [v[2] for v in final.values()]
        fully = sum(1 for v in final.values() if v[1] >= v[0])
        print()
        print(f"fleet result: {args.agents} agents, rate {args.rate:g}/s each ({args.agents * args.rate:g}/s offered), "
              f"{args.workers} worker processes")
        print(f"  steady {steady['seconds']:.0f}s: offered {steady['sent'] / steady['seconds']:.0f}/s, journaled "
              f"{steady['journaled'] / steady['seconds']:.0f}/s, backlog at end {max(0, steady['backlog'])}, "
              f"{steady['machine']}, load {steady['load']}")
        print("  CPU over the steady phase (core-seconds per second): " + ", ".join(
            f"{r} {c / steady['seconds']:.2f}" for r, c in sorted(steady_cpu.items())))
        print("  peak RSS: " + ", ".join(f"{r} {v / 2**20:.0f}MiB" for r, v in sorted(meter.peak_rss.items())))
        if storm:
            print(f"  reconnect storm: all {storm['back']}/{args.agents} back in {storm['all_back_s']:.1f}s, "
                  f"peak {storm['peak_per_s']} connects/s, failed attempts {storm['connect_fail']}")
            print(f"  broker {storm['probe']}")
        print(f"  drain {drain_s:.0f}s; sent {len(expected)} (agent, seq), journaled {len(got)} "
              f"(missing {len(missing)}, duplicated {dupes}, unexpected {len(extra)}); executions "
              f"{execs[0][0] if execs else 0} rows / {execs[0][1] if execs else 0} task ids")
        print(f"  receipts delivered {sum(receipts)} (per agent min {min(receipts, default=0)}, max {max(receipts, default=0)}); "
              f"agents whose highest receipted seq = last sent: {fully}/{len(final)}; re-sent {total(handles, 'resent')}")
        print("  CPU over the whole run (core-seconds): " + ", ".join(f"{r} {c:.0f}" for r, c in sorted(cpu_all.items())))
        if missing:
            print("  missing sample: " + ", ".join(f"{a}#{s}" for a, s in sorted(missing)[:10]))
        ok = not missing and not dupes and fully == len(final)
        print("  EVERY READING STORED ONCE AND RECEIPTED" if ok else "  NOT all readings stored once and receipted")
        return 0 if ok else 1
    except SystemExit:
        args.keep = True  # the message names a file in it
        raise
    finally:
        for h in handles:
            if h.proc.poll() is None:
                os.killpg(h.proc.pid, signal.SIGKILL)
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
        if args.keep:
            print(f"  kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--rate", type=float, default=1.0, help="readings per second per agent (default 1)")
    p.add_argument("--duration", type=float, default=300.0, help="steady phase seconds (default 300)")
    p.add_argument("--workers", type=int, default=0, help="harness processes (default: one per 250 agents)")
    p.add_argument("--connect-threads", type=int, default=8, help="concurrent TLS handshakes per worker")
    p.add_argument("--no-storm", dest="storm", action="store_false", help="skip the broker restart")
    p.add_argument("--storm-timeout", type=float, default=300.0)
    p.add_argument("--storm-tail", type=float, default=60.0, help="seconds of readings after all reconnected")
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--resend-after", type=float, default=0.0, help="override the agent's resend_after")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (coordinator log, journal)")
    args = p.parse_args()
    if not args.workers:
        args.workers = max(1, math.ceil(args.agents / 250))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
