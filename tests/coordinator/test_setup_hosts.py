"""docs/SETUP-HOSTS.md, followed on loopback: the guide's own shell blocks, in order.

Why extract them: a setup guide that nobody runs rots; here every block marked
`host=coordinator`, `host=device` or `transfer` is executed as written (bash -e), with
two directory trees standing in for the two hosts, `scp` turned into a local copy, and
the guide's names and ports swapped for loopback ones. Blocks marked `service` are the
long-running processes (systemd's ExecStart): started, waited for, stopped. It ends as
the guide does: the device's readings journaled, anchored, and `edge-audit verify` passing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent.support import Proc, kill_group
from tests.support.net import free_port

from .support import ROOT, CoordinatorProcess, wait_until

pytestmark = pytest.mark.slow

GUIDE = ROOT / "docs" / "SETUP-HOSTS.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)

#: `scp [-r] [host:]src [host:]dst` as a local copy: both "hosts" share this file system.
SCP = r'''scp() {
  local args=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9.-]+:(/.*)$ ]]; then a=${BASH_REMATCH[1]}; fi
    args+=("$a")
  done
  cp "${args[@]}"
}
'''


@dataclass
class Block:
    kind: str  # "coordinator", "device" or "transfer"
    service: bool
    script: str


def guide_blocks(text: str) -> list[Block]:
    out = []
    for lang, info, body in BLOCK.findall(text):
        words = info.split()
        if lang != "sh" or not words:
            continue  # illustration only (firewall rules, ...)
        kind = "transfer" if "transfer" in words else next(w.split("=", 1)[1] for w in words if w.startswith("host="))
        out.append(Block(kind, "service" in words, body))
    return out


def localise(text: str, mapping: dict[str, str]) -> str:
    for token, value in mapping.items():
        assert token in text, f"the guide no longer mentions {token!r}: update this test's mapping"
        text = re.sub(rf"(?<![\w.]){re.escape(token)}(?![\w])", value, text)
    return text


def test_setup_guide_on_loopback(tmp_path: Path) -> None:
    coord_root, device_root = tmp_path / "coord-host", tmp_path / "device-host"
    for root in (coord_root, device_root):
        (root / "tmp").mkdir(parents=True)
    broker_port, chain_port, http_port = free_port(), free_port(), free_port()
    mapping = {
        "/var/lib/edge-coordinator": str(coord_root / "var/lib/edge-coordinator"),
        "/var/lib/edge-agent": str(device_root / "var/lib/edge-agent"),
        "/srv/enrol": str(coord_root / "srv/enrol"),
        "/tmp/enrol-pi-01": str(device_root / "tmp/enrol-pi-01"),
        "coord.example.net": "127.0.0.1",
        "8883": str(broker_port),
        "8545": str(chain_port),
        "9464": str(http_port),
    }
    blocks = guide_blocks(localise(GUIDE.read_text(), mapping))
    assert [b.kind for b in blocks] == ["coordinator", "coordinator", "coordinator", "device", "transfer", "coordinator",
                                        "transfer", "device", "device", "coordinator"]

    base = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "EDGE_COORDINATOR_", "EDGE_AUDIT_"))}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    envs = {
        "coordinator": {**base, "EDGE_AUDIT_PINS": str(coord_root / "audit-pins.json")},
        "device": {**base, "EDGE_AGENT_INTERVAL": "0.3", "EDGE_AGENT_BACKOFF_MIN": "0.1", "EDGE_AGENT_BACKOFF_MAX": "1"},
        "transfer": base,
    }
    coord = CoordinatorProcess(Path(mapping["/var/lib/edge-coordinator"]), broker_port, chain_port, http_port)
    device_data = Path(mapping["/var/lib/edge-agent"])
    agent: Proc | None = None
    outputs: list[str] = []
    try:
        for number, block in enumerate(blocks[:-1]):
            if block.service and block.kind == "coordinator":
                with open(coord.log_path, "ab") as log:
                    coord.proc = subprocess.Popen(["bash", "-c", f"exec {block.script.strip()}"], cwd=tmp_path,
                                                  env=envs["coordinator"], stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True)
                wait_until(lambda: coord.healthy() or coord._died(), 120, "the coordinator host up (/healthz ok)")
            elif block.service:
                agent = Proc(["bash", "-c", f"exec {block.script.strip()}"], tmp_path / "device.log", env=envs["device"])
                agent.start().wait_for_output("ready in", timeout=90)
            else:
                out = subprocess.run(["bash", "-euo", "pipefail", "-c", SCP + block.script], cwd=tmp_path,
                                     env=envs[block.kind], capture_output=True, text=True, timeout=180)
                assert out.returncode == 0, f"block {number} ({block.kind}) failed:\n{block.script}\n{out.stdout}{out.stderr}"
                outputs.append(out.stdout)

        wait_until(lambda: coord.readings() >= 10, 90, "readings from pi-01 journaled")
        assert agent is not None
        agent.stop()
        status = json.loads(subprocess.run([sys.executable, "-m", "agent", "--data-dir", str(device_data), "status", "--json"],
                                           cwd=ROOT, capture_output=True, text=True, env=envs["device"]).stdout)
        sent = status["outbox"]["next_seq"] - 1
        wait_until(lambda: coord.readings() == sent, 60, f"all {sent} readings journaled")
        assert coord.query("SELECT DISTINCT agent_id FROM readings") == [("pi-01",)]
        wait_until(coord.all_confirmed, 90, "every journal row anchored")

        final = blocks[-1]
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", final.script], cwd=tmp_path, env=envs["coordinator"],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert re.search(r"^pi-01\s", out.stdout, re.M), out.stdout
    finally:
        if agent is not None and agent.proc is not None:
            kill_group(agent.proc)
        coord.cleanup()
    # the doctors the guide runs passed (exit 0 under bash -e) and said what they checked
    assert any("edge-coordinator doctor:" in o for o in outputs)
    assert any("TLS handshake and MQTT CONNECT as 'pi-01' accepted" in o for o in outputs)
