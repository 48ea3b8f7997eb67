"""Results and command results cannot be forged by another fleet member (issue #9, #11).

Real processes: `edge-coordinator run` (Mosquitto with mutual TLS, ACL in file mode),
a real `edge-agent run`, `edge-coordinator send` as a subprocess. The attacker holds a
valid agent certificate (`cmd-b`) and talks MQTT to the same broker.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.prom import sample

from .support import ROOT, CoordinatorProcess, audit, cli, wait_until

pytestmark = pytest.mark.slow

PREFIX = "kombu"  # the coordinator's default topic prefix


class Agent:
    """A real `edge-agent` enrolled from a coordinator bundle; started and stopped at will."""

    def __init__(self, coordinator: CoordinatorProcess, name: str, home: Path) -> None:
        self.coordinator, self.name, self.home = coordinator, name, home
        self.proc: subprocess.Popen | None = None
        out = subprocess.run([sys.executable, "-m", "agent.cli", "--data-dir", str(home), "enroll", "--bundle",
                              str(coordinator.bundle(name))], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr

    def start(self) -> Agent:
        log = open(self.home.parent / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "--data-dir", str(self.home), "run",
                                      "--interval", "1"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.proc = None


@pytest.fixture
def fleet(coordinator: CoordinatorProcess, tmp_path: Path):
    """A running coordinator with agents cmd-a (real, has sent a reading, then stopped:
    its persistent session holds commands until it returns) and cmd-b (the attacker)."""
    coordinator.init("cmd-a", "cmd-b").start()
    agent = Agent(coordinator, "cmd-a", tmp_path / "agent-home").start()
    try:
        wait_until(lambda: coordinator.readings() >= 1, 90, "the agent's first reading")
        agent.stop()
        yield coordinator, agent
    finally:
        agent.stop()


def mqtt_client(coordinator: CoordinatorProcess, name: str):
    """A raw MQTT 5 client over mutual TLS as `name` (a bundle, or the coordinator itself)."""
    from tests.security.broker import probe

    if name == "coordinator":
        pki = coordinator.data_dir / "pki"
        return probe(coordinator.broker_port, pki / "ca.pem", pki / "coordinator.pem", pki / "coordinator.key")
    bundle = coordinator.bundle(name)
    return probe(coordinator.broker_port, bundle / "ca.pem", bundle / f"{name}.pem", bundle / f"{name}.key")


def wire_properties(payload: bytes) -> dict[str, Any]:
    """kombu's message properties (reply_to, correlation_id) from the MQTT payload."""
    return json.loads(payload)["properties"]


def signed_result(coordinator: CoordinatorProcess, signer: str, task_id: str, result: Any) -> bytes:
    """A Celery rpc:// result for `task_id`, signed with `signer`'s real key and certificate."""
    from security.codec import Identity
    from security.envelope import certificate_pem
    from security.pki import load_certificate, load_private_key

    bundle = coordinator.bundle(signer)
    identity = Identity(load_private_key(bundle / f"{signer}.key"),
                         certificate_pem(load_certificate(bundle / f"{signer}.pem")))
    meta = {"status": "SUCCESS", "result": result, "traceback": None, "children": [], "date_done": None,
            "task_id": task_id}
    return identity.encode(meta)


def publish_result(coordinator: CoordinatorProcess, signer: str, reply_to: str, task_id: str, body: bytes) -> None:
    """Publish `body` as an rpc:// result through the MQTT transport, as `signer`."""
    from kombu import Connection, Exchange, Producer

    import kombu_mqtt  # noqa: F401  (registers mqtts://)
    from security.codec import CONTENT_TYPE

    bundle = coordinator.bundle(signer)
    ssl = {"ca_certs": str(bundle / "ca.pem"), "certfile": str(bundle / f"{signer}.pem"),
           "keyfile": str(bundle / f"{signer}.key")}
    with Connection(f"mqtts://127.0.0.1:{coordinator.broker_port}", ssl=ssl,
                    transport_options={"identity": f"forger-{uuid.uuid4().hex[:6]}"}) as conn:
        Producer(conn.channel()).publish(
            body, exchange=Exchange("c.rep", type="direct", durable=False, auto_delete=True), routing_key=reply_to,
            correlation_id=task_id, content_type=CONTENT_TYPE, content_encoding="binary", serializer=None,
        )


def drain(app) -> None:
    """Let the caller's result consumer take in what arrived (nothing: a quiet timeout)."""
    try:
        app.backend.result_consumer.drain_events(timeout=0.5)
    except TimeoutError:
        pass


def quarantined(coordinator: CoordinatorProcess, reason: str) -> list:
    from security.quarantine import Quarantine

    path = coordinator.data_dir / "quarantine.sqlite"
    return Quarantine(path).rows(reason) if path.exists() else []


def test_result_signed_by_another_agent_is_refused_and_the_genuine_one_returned(fleet, tmp_path: Path) -> None:
    coordinator, agent = fleet
    spy = mqtt_client(coordinator, "coordinator")  # sees the command as it is published
    try:
        spy.subscribe(f"{PREFIX}/d/+/agent.cmd-a")
        send = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "send", "--data-dir", str(coordinator.data_dir),
                                 "cmd-a", "status", "--timeout", "120", "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            wait_until(lambda: spy.messages, 60, "the command on the agent's queue")
            props = wire_properties(spy.messages[0][1])
            task_id, reply_to = props["correlation_id"], props["reply_to"]
            # recorded before it was published
            assert coordinator.query("SELECT agent_id, command FROM commands WHERE task_id = ?", (task_id,)) == [
                ("cmd-a", "edge.agent.status")]
            forged = signed_result(coordinator, "cmd-b", task_id, {"agent_id": "cmd-a", "forged": True})
            publish_result(coordinator, "cmd-b", reply_to, task_id, forged)
            rows = wait_until(lambda: quarantined(coordinator, "result_unbound"), 60, "the forgery quarantined")
            assert [(r.signer, r.task_id, r.body) for r in rows] == [("cmd-b", task_id, forged)]
            assert send.poll() is None, "the forgery must not answer the command"
            agent.start()  # the genuine agent now runs the waiting command and answers
            out, err = send.communicate(timeout=120)
        finally:
            if send.poll() is None:
                send.kill()
                send.wait()
        assert send.returncode == 0, err
        reply = json.loads(out)
        assert reply["task_id"] == task_id and reply["status"] == "SUCCESS"
        assert reply["result"]["agent_id"] == "cmd-a" and "forged" not in reply["result"]
        assert "reason=result_unbound" in err  # logged by the caller
    finally:
        spy.close()


def test_replayed_result_is_refused_and_does_not_change_the_answer(fleet, tmp_path: Path) -> None:
    """A caller waiting on several commands: the genuine result re-sent is a replay."""
    from coordinator.celery_app import make_app
    from coordinator.config import load_config
    from security import metrics
    from tests.support.celery_apps import close_app

    coordinator, agent = fleet
    spy = mqtt_client(coordinator, "coordinator")  # records the genuine result as it passes
    app = make_app(load_config(data_dir=coordinator.data_dir), consumer=False)
    try:
        spy.subscribe(f"{PREFIX}/d/c.rep/+")
        task_id = str(uuid.uuid4())
        app.backend.expect(task_id, "cmd-a")
        result = app.send_task("edge.agent.status", queue="agent.cmd-a", retry=False, task_id=task_id)
        agent.start()
        genuine = result.get(timeout=120)
        assert genuine["agent_id"] == "cmd-a"
        topic, raw = wait_until(lambda: spy.messages[:1], 30, "the genuine result seen on the wire")[0]
        before = metrics.REFUSALS.get("result_replay")
        assert spy.publish(topic, raw) == 0  # the very same message again
        wait_until(lambda: drain(app) or quarantined(coordinator, "result_replay"), 60, "the replay quarantined")
        assert metrics.REFUSALS.get("result_replay") == before + 1
        assert [r.task_id for r in quarantined(coordinator, "result_replay")] == [task_id]
        assert result.get(timeout=5) == genuine
    finally:
        close_app(app)
        spy.close()


def test_command_result_for_a_command_never_sent_is_rejected(fleet) -> None:
    from coordinator.simagent import INGEST_QUEUE, SimAgent
    from security.contract import command_result_task_id
    from tests.support.celery_apps import close_app

    coordinator, _ = fleet
    sim = SimAgent(coordinator.bundle("cmd-b"))
    command_task_id = str(uuid.uuid4())  # never sent by the coordinator
    task_id = command_result_task_id("cmd-b", command_task_id)
    payload = {"agent_id": "cmd-b", "command_task_id": command_task_id, "command": "edge.agent.status",
               "status": "SUCCESS", "result": {"agent_id": "cmd-b"}, "finished_at": time.time()}
    try:
        sim.app.send_task("edge.command_result", kwargs={"result": payload}, queue=INGEST_QUEUE, task_id=task_id)
    finally:
        close_app(sim.app)
    wait_until(lambda: coordinator.query("SELECT status FROM executions WHERE task_id = ?", (task_id,)), 60,
               "the command result journaled")
    assert coordinator.query("SELECT status FROM executions WHERE task_id = ?", (task_id,)) == [("REJECTED",)]
    assert coordinator.query("SELECT COUNT(*) FROM command_results WHERE command_task_id = ?",
                             (command_task_id,)) == [(0,)]
    assert sample(coordinator.metrics(), "edgeledger_tasks_refused_total", reason="unknown_command") == 1


def test_failed_command_is_journaled_as_failure(fleet) -> None:
    from coordinator.ingest import canonical_digest

    coordinator, agent = fleet
    agent.start()
    # 0.001 s is a number (the signature check passes) that the device refuses (below its minimum)
    out = cli("send", "--data-dir", str(coordinator.data_dir), "cmd-a", "set_interval", "0.001", "--timeout", "120",
              "--json")
    assert out.returncode == 3, out.stderr  # security.exit_codes.TASK_FAILED
    reply = json.loads(out.stdout)
    assert reply["status"] == "FAILURE"
    rows = wait_until(lambda: coordinator.query(
        "SELECT task_id, command, status, args_digest FROM command_results WHERE command_task_id = ?",
        (reply["task_id"],)), 60, "the failed command's result journaled")
    (result_task, command, status, args_digest), = rows
    assert (command, status, args_digest) == ("edge.agent.set_interval", "FAILURE", canonical_digest([0.001]))
    listed = audit(coordinator.data_dir, "list", "--status", "failure", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["task_id"], r["task_name"], r["agent_id"]) for r in json.loads(listed.stdout)] == [
        (result_task, "edge.command_result", "cmd-a")]
