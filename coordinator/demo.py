"""`edge-coordinator demo`: the whole system on loopback, then an independent audit.

Why subprocesses throughout: the demo must show the product as an operator runs it —
`edge-coordinator run` as a daemon, each agent as a real `edge-agent` process enrolled
from a bundle, `edge-audit verify` as the auditor's own tool — coordinated only through
the CLIs, files and the broker. Exit 0 only when every journaled execution is verified
on chain with its agent's signature.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ledger.journal import JournalReader, open_reader
from ledger.processes import ChildProcess, ProcessStartError, stop_all

from .broker_acl import agent_enrolled
from .config import load_config, save_config
from .errors import CoordinatorError
from .fleet_pki import FleetStore
from .supervisor import free_port

T = TypeVar("T")

PY = sys.executable
COMMAND_PLAN = (("sample_now", []), ("set_interval", ["1.0"]), ("status", []))


def _say(text: str = "") -> None:
    print(text, flush=True)


@dataclass
class AgentProc:
    name: str
    bundle: Path
    home: Path
    kind: str = "edge-agent"
    proc: ChildProcess | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.home.parent / f"{self.name}.log"


class Demo:
    def __init__(self, base: Path, agents: int, duration: float, interval: float) -> None:
        self.base = base
        self.n_agents = agents
        self.duration = duration
        self.interval = interval
        self.data_dir = base / "coordinator"
        self.coordinator: ChildProcess | None = None
        self.agents: list[AgentProc] = []
        self.cfg: Any = None

    # -- setup ------------------------------------------------------------------------
    def init(self) -> None:
        cfg = load_config(data_dir=self.data_dir, env={})
        cfg.data_dir = self.data_dir.resolve()
        cfg.broker.port, cfg.chain.port, cfg.http.port = free_port(), free_port(), free_port()
        cfg.chain.batch_interval = 0.5
        FleetStore(cfg).init()
        save_config(cfg)
        self.cfg = cfg
        _say(f"[1/6] fresh PKI and config in {self.data_dir}")

    def start_coordinator(self, timeout: float = 90.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_COORDINATOR_")}
        self.coordinator = ChildProcess("the coordinator", [PY, "-m", "coordinator.cli", "run", "--data-dir", str(self.data_dir)],
                                        self.base / "coordinator.log", env=env).start()
        try:
            self.coordinator.wait_until(self._healthy, timeout, "a healthy /healthz", poll=0.2)
        except ProcessStartError as exc:
            raise CoordinatorError(f"{exc}; see {self.base / 'coordinator.log'}") from None
        _say(f"[2/6] coordinator up: mosquitto {self.cfg.broker_url} (mutual TLS), anvil {self.cfg.chain_url}, "
             f"metrics http://127.0.0.1:{self.cfg.http.port}/metrics")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.cfg.http.port}/healthz", timeout=2) as resp:
                return bool(json.loads(resp.read())["ok"])
        except (OSError, ValueError):
            return False

    def start_agents(self) -> None:
        store = FleetStore(self.cfg)
        for i in range(1, self.n_agents + 1):
            name = f"sensor-{i}"
            bundle = store.make_bundle(name, self.base / "bundles" / name, self.cfg.broker_url)
            agent_enrolled(self.cfg, name)  # dynsec (the default): the running broker learns its rights now
            agent = AgentProc(name=name, bundle=bundle, home=self.base / "agents" / name)
            enroll = subprocess.run(
                [PY, "-m", "agent.cli", "--data-dir", str(agent.home), "enroll", "--bundle", str(bundle)],
                capture_output=True, text=True, timeout=60,
            )
            if enroll.returncode == 0:
                argv = [PY, "-m", "agent.cli", "--data-dir", str(agent.home), "run", "--interval", str(self.interval)]
            else:  # the agent package cannot run here: a signed stand-in keeps the demo honest about it
                agent.kind = "simagent (edge-agent enroll failed: " + (enroll.stderr.strip().splitlines() or ["?"])[-1][:80] + ")"
                argv = [PY, "-m", "coordinator.simagent", "--bundle", str(bundle), "--count", "0",
                        "--duration", str(self.duration + 5), "--interval", str(self.interval), "--heartbeat-every", "10"]
            agent.proc = ChildProcess(name, argv, agent.log_path).start()
            self.agents.append(agent)
        kinds = {a.kind for a in self.agents}
        _say(f"[3/6] enrolled and started {self.n_agents} agents ({', '.join(sorted(kinds))}), sampling every {self.interval:g}s")

    # -- running ----------------------------------------------------------------------
    def read(self, ask: Callable[[JournalReader], T], empty: T) -> T:
        """`ask` on a read-only view of the journal; `empty` while its file or table does not exist yet."""
        path = self.data_dir / "journal.db"
        if not path.exists():
            return empty
        try:
            with open_reader(path, timeout=10) as reader:
                return ask(reader)
        except sqlite3.OperationalError:
            return empty

    def progress_line(self, elapsed: float) -> str:
        readings = self.read(JournalReader.readings_per_agent, {})
        states = self.read(JournalReader.state_counts, {})
        per_agent = " ".join(f"{a.name}={readings.get(a.name, 0)}" for a in self.agents)
        return (f"  t={elapsed:4.0f}s  readings {per_agent}  | journal {sum(states.values())} "
                f"on-chain {states.get('confirmed', 0)} pending {states.get('pending', 0) + states.get('sent', 0)}")

    def run_agents(self) -> list[dict[str, Any]]:
        from .dispatch import send_command

        _say(f"[4/6] running for {self.duration:g}s; commands go out half-way")
        tty = sys.stdout.isatty()
        start = time.monotonic()
        sent: list[dict[str, Any]] = []
        last_print = 0.0
        while (elapsed := time.monotonic() - start) < self.duration:
            for a in self.agents:
                if a.proc is not None and not a.proc.alive():
                    raise CoordinatorError(f"agent {a.name} exited early ({a.proc.returncode}); see {a.log_path}")
            if not sent and elapsed >= self.duration / 2:
                sent = self.dispatch(send_command)
            if tty:
                sys.stdout.write("\r" + self.progress_line(elapsed)[:150].ljust(150))
                sys.stdout.flush()
            elif elapsed - last_print >= 5:
                _say(self.progress_line(elapsed))
                last_print = elapsed
            time.sleep(0.5)
        if not sent:
            sent = self.dispatch(send_command)
        if tty:
            sys.stdout.write("\n")
        _say(self.progress_line(time.monotonic() - start))
        return sent

    def dispatch(self, send_command: Any) -> list[dict[str, Any]]:
        if sys.stdout.isatty():
            sys.stdout.write("\n")
        out = []
        for agent, (command, args) in zip(self.agents * 3, COMMAND_PLAN, strict=False):
            if agent.kind != "edge-agent":
                _say(f"  send {agent.name} {command}: skipped (stand-in publisher has no command queue)")
                continue
            try:
                res = send_command(self.cfg, agent.name, command, args, timeout=30)
                brief = json.dumps(res["result"], default=str)
                _say(f"  send {agent.name} {command} {' '.join(args)} -> {res['status']} in {res['seconds']}s: {brief[:90]}")
                out.append(res)
            except CoordinatorError as exc:
                _say(f"  send {agent.name} {command}: FAILED: {exc}")
                out.append({"agent": agent.name, "command": command, "status": "FAILED", "error": str(exc)})
        return out

    def stop_agents(self) -> None:
        stop_all((a.proc for a in self.agents), timeout=30)

    def wait_anchored(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        last_total = -1
        while time.monotonic() < deadline:
            states = self.read(JournalReader.state_counts, {})
            total = sum(states.values())
            if total and states.get("confirmed", 0) == total and total == last_total:
                return
            last_total = total
            time.sleep(1.0)
        raise CoordinatorError(f"journal rows still waiting for the chain after {timeout:g}s: see {self.base / 'coordinator.log'}")

    # -- audit ------------------------------------------------------------------------
    def audit(self) -> dict[str, Any]:
        proc = subprocess.run(
            [PY, "-m", "ledger.audit_cli", "--journal", str(self.data_dir / "journal.db"), "--json", "verify",
             "--require-anchored", "--quiet", "--pins", str(self.base / "audit-pins.json")],
            capture_output=True, text=True, timeout=180,
        )
        try:
            return json.loads(proc.stdout)
        except ValueError:
            raise CoordinatorError(f"edge-audit verify gave no report (exit {proc.returncode}): {proc.stderr.strip()[-300:]}") from None

    def summary(self, report: dict[str, Any], commands: list[dict[str, Any]]) -> bool:
        rows = self.read(JournalReader.counts_by_agent_and_task, [])
        per: dict[str, dict[str, int]] = {}
        for agent, task, n, confirmed in rows:
            per.setdefault(agent, {})[task.rsplit(".", 1)[-1]] = n
            per[agent]["confirmed"] = per[agent].get("confirmed", 0) + int(confirmed or 0)
        _say("[6/6] audit (edge-audit verify: record in the signed log, checkpoint anchored on chain, "
             "agent signature vs certificate)")
        _say(f"  {'AGENT':<12} {'INGEST':>7} {'HEARTBEAT':>9} {'CMD RESULT':>10} {'COSIGNED':>8} {'ON CHAIN':>9}")
        for agent, c in sorted(per.items()):
            _say(f"  {agent:<12} {c.get('ingest', 0):>7} {c.get('heartbeat', 0):>9} {c.get('command_result', 0):>10} "
                 f"{c.get('cosign', 0):>8} {c.get('confirmed', 0):>9}")
        findings = report.get("findings") or []
        ok = bool(report.get("ok")) and not findings
        all_agents_sent = all(per.get(a.name, {}).get("ingest", 0) > 0 for a in self.agents)
        _say(f"  records {report.get('rows')}  in anchored checkpoints {report.get('on_chain')}  checkpoints "
             f"anchored {report.get('anchored_checkpoints')}  signatures verified {report.get('signatures_ok')}  "
             f"findings {len(findings)}")
        for f in findings[:5]:
            _say(f"    finding: {json.dumps(f, default=str)[:160]}")
        failed = [c for c in commands if c.get("status") != "SUCCESS"]
        if failed:
            _say(f"  commands failed: {len(failed)} of {len(commands)}")
        verdict = ok and all_agents_sent and not failed
        _say("RESULT: " + ("all records verified" if verdict else "NOT verified (see above)"))
        return verdict

    # -- teardown -----------------------------------------------------------------------
    def stop_coordinator(self) -> None:
        proc, self.coordinator = self.coordinator, None
        if proc is None or not proc.alive():
            return
        proc.stop(timeout=60)
        # a broker left by a killed daemon must not outlive the demo
        pid_file = self.data_dir / "run" / "mosquitto" / "mosquitto.pid"
        try:
            pid = int(pid_file.read_text())
            if str(self.data_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            pass


def run_demo(agents: int = 3, duration: float = 20.0, interval: float = 0.5, data_dir: Path | None = None, keep: bool = False) -> int:
    from .celery_app import require_mqtt_transport

    if agents < 1 or duration <= 0 or interval <= 0:
        raise CoordinatorError("--agents must be >= 1, --duration and --interval > 0")
    require_mqtt_transport()  # fail before starting anything
    if data_dir is not None:
        base = Path(data_dir).resolve()
        if base.exists() and any(base.iterdir()):
            raise CoordinatorError(f"demo dir {base} is not empty: pick a new --data-dir (the demo starts from a fresh PKI)")
        base.mkdir(parents=True, exist_ok=True)
        keep = True
    else:
        base = Path(tempfile.mkdtemp(prefix="edgeledger-demo-"))
    demo = Demo(base, agents, duration, interval)
    verdict = False
    try:
        demo.init()
        demo.start_coordinator()
        demo.start_agents()
        commands = demo.run_agents()
        demo.stop_agents()
        _say("[5/6] agents stopped (outboxes flushed); waiting for the chain writer to anchor everything")
        demo.wait_anchored()
        verdict = demo.summary(demo.audit(), commands)
    finally:
        demo.stop_agents()
        demo.stop_coordinator()
        if keep:
            _say(f"demo files kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0 if verdict else 1
