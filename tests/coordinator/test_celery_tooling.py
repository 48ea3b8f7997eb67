"""Celery's own tooling against a real coordinator: `celery -A coordinator.tooling ...` and Flower.

One real `edge-coordinator run` (Mosquitto in dynsec mode, anvil, ingest worker) for
the module; every tool runs as a subprocess with the documented command
(docs/OPERATIONS.md "Celery tooling"), the coordinator's data dir in
EDGE_COORDINATOR_DATA_DIR. Tasks come from `coordinator.simagent` signing as an
enrolled agent, so what the tools show is real ingestion.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from security.contract import reading_task_id
from tests.support.net import free_port

from .support import ROOT, CoordinatorProcess, simagent, wait_until

pytestmark = pytest.mark.slow

CELERY = [sys.executable, "-m", "celery", "-A", "coordinator.tooling"]
AGENT = "tool-a"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    proc = CoordinatorProcess(tmp_path_factory.mktemp("tooling") / "coord")
    proc.init(AGENT)
    proc.start()
    yield proc
    proc.cleanup()


def tool_env(coordinator: CoordinatorProcess) -> dict[str, str]:
    return {**os.environ, "EDGE_COORDINATOR_DATA_DIR": str(coordinator.data_dir)}


def celery(coordinator: CoordinatorProcess, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CELERY, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=tool_env(coordinator))


def replies(out: subprocess.CompletedProcess) -> dict[str, Any]:
    """The JSON line `celery inspect/status --json` prints (node name -> reply)."""
    assert out.returncode == 0, out.stdout + out.stderr
    line = next((x for x in out.stdout.splitlines() if x.startswith("{")), None)
    assert line is not None, f"no JSON reply in: {out.stdout!r} {out.stderr!r}"
    return json.loads(line)


def coordinator_node(nodes: dict[str, Any]) -> str:
    names = [name for name in nodes if name.startswith("coordinator@")]
    assert len(names) == 1, f"expected the coordinator's worker among {list(nodes)}"
    return names[0]


def send_readings(coordinator: CoordinatorProcess, count: int, start_seq: int) -> None:
    before = coordinator.readings()
    pub = simagent(coordinator.bundle(AGENT), "--count", str(count), "--start-seq", str(start_seq))
    out, err = pub.communicate(timeout=120)
    assert pub.returncode == 0, out + err
    wait_until(lambda: coordinator.readings() >= before + count, 60, f"{count} readings journaled")


def test_inspect_ping_active_stats_registered_and_status_show_the_coordinator(coordinator) -> None:
    ping = replies(celery(coordinator, "inspect", "ping", "--json", "-t", "10"))
    node = coordinator_node(ping)
    assert ping[node] == {"ok": "pong"}
    # with a destination Celery returns on the node's reply instead of waiting out -t
    to_node = ("--json", "-t", "10", "-d", node)

    assert replies(celery(coordinator, "inspect", "active", *to_node)) == {node: []}

    stats = replies(celery(coordinator, "inspect", "stats", *to_node))[node]
    assert stats["broker"]["transport"] == "mqtts"
    assert stats["pool"]["implementation"].endswith(":TaskPool")  # the solo pool
    assert stats["pid"] > 0

    registered = replies(celery(coordinator, "inspect", "registered", *to_node))[node]
    assert {"edge.ingest", "edge.command_result", "edge.heartbeat"} <= set(registered)

    status = celery(coordinator, "status", "--json", "-t", "10")
    assert coordinator_node(replies(status)) == node
    assert "1 node online." in status.stdout


def test_active_queues_name_the_ingest_queue(coordinator) -> None:
    node = f"coordinator@{socket.gethostname()}"  # the daemon's node name on this host
    queues = replies(celery(coordinator, "inspect", "active_queues", "--json", "-t", "10", "-d", node))
    (node,) = queues
    assert [q["name"] for q in queues[node]] == ["edge.ingest"]


class LineReader:
    """stdout of a long-running tool, line by line, readable with a timeout."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, *needles: str, timeout: float) -> str:
        def found() -> str | None:
            while True:
                try:
                    line = self.lines.get_nowait()
                except queue.Empty:
                    return None
                self.seen.append(line)
                if all(n in line for n in needles):
                    return line

        return wait_until(found, timeout, f"a line with {needles} (seen: {self.seen[-5:]})", interval=0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_task_events_are_off_by_default_and_enable_events_turns_them_on(coordinator) -> None:
    """worker.task_events defaults to off (they cost throughput); heartbeats flow anyway,
    and the documented `celery control enable_events` (signed by the coordinator identity)
    turns task events on in the running worker."""
    proc = subprocess.Popen([*CELERY, "events", "--dump"], cwd=ROOT, env=tool_env(coordinator), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        reader = LineReader(proc)
        beat = reader.wait_for("coordinator@", "heartbeat:", timeout=60)  # the worker sends one every 2 s
        node = beat.split()[0]
        send_readings(coordinator, 2, start_seq=100)  # journaled with task events off
        enabled = celery(coordinator, "control", "enable_events", "-d", node, "-t", "10")
        # "enabled", not "already enabled": they were off
        assert enabled.returncode == 0 and "task events enabled" in enabled.stdout, enabled.stdout + enabled.stderr
        send_readings(coordinator, 2, start_seq=102)
        reader.wait_for("coordinator@", "task succeeded", reading_task_id(AGENT, 103), timeout=60)
        # the worker runs tasks in order: had events been on, 100's and 101's would have come first
        dumped = "".join(reader.seen)
        assert reading_task_id(AGENT, 102) in dumped
        assert reading_task_id(AGENT, 100) not in dumped and reading_task_id(AGENT, 101) not in dumped
    finally:
        stop(proc)


def flower_get(port: int, path: str, auth: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def test_flower_lists_the_coordinator_worker_and_its_task_history(coordinator) -> None:
    pytest.importorskip("flower", reason="Flower is the optional extra `.[flower]` (also in `.[test]`)")
    node = f"coordinator@{socket.gethostname()}"
    # task events off (the default; another test here may have enabled them): Flower must enable them
    disabled = celery(coordinator, "control", "disable_events", "-d", node, "-t", "10")
    assert disabled.returncode == 0 and ("task events disabled" in disabled.stdout
                                         or "task events already disabled" in disabled.stdout), disabled.stdout
    port = free_port()
    auth = f"operator:{secrets.token_hex(8)}"
    # the command documented in docs/OPERATIONS.md, on a free port
    proc = subprocess.Popen([*CELERY, "flower", "--address=127.0.0.1", f"--port={port}", f"--basic-auth={auth}"],
                            cwd=ROOT, env=tool_env(coordinator), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        def workers() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise AssertionError(f"flower exited with {proc.returncode}")
            try:
                found = flower_get(port, "/api/workers?refresh=1", auth)
            except (OSError, urllib.error.URLError, ValueError):
                return None
            return found if any(name.startswith("coordinator@") for name in found) else None

        listed = wait_until(workers, 90, "Flower listing the coordinator's worker")
        node = coordinator_node(listed)
        assert {"edge.ingest", "edge.heartbeat", "edge.command_result"} <= set(listed[node]["registered"])

        with pytest.raises(urllib.error.HTTPError) as refused:  # the API is not open without the password
            flower_get(port, "/api/workers", "operator:wrong")
        assert refused.value.code == 401

        def ingested() -> list[dict[str, Any]]:
            tasks = flower_get(port, "/api/tasks?taskname=edge.ingest&state=SUCCESS", auth)
            return [t for t in tasks.values() if t.get("worker") == node]

        # Flower turns task events on itself (every few seconds): readings sent before that
        # are journaled but not in its history, so keep sending until three are
        seqs = itertools.count(200)

        def three_seen() -> list[dict[str, Any]] | None:
            send_readings(coordinator, 1, start_seq=next(seqs))
            got = ingested()
            return got if len(got) >= 3 else None

        done = wait_until(three_seen, 120, "3 edge.ingest tasks in Flower's history")
        assert all(t["name"] == "edge.ingest" and t["state"] == "SUCCESS" for t in done)
    finally:
        stop(proc)


def test_tooling_without_the_coordinator_config_fails_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run([*CELERY, "status"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "EDGE_COORDINATOR_DATA_DIR": str(tmp_path / "nowhere")})
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "EDGE_COORDINATOR_DATA_DIR" in out.stderr and "edge-coordinator init" in out.stderr
