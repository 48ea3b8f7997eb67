"""`edge-agent run` against a real Mosquitto over mutual TLS, with a signed receiver.

Claims: readings arrive signed by the agent, in seq order, with deterministic task
ids; commands run and answer over rpc:// and are reported as edge.command_result;
an outage loses nothing; a SIGKILL mid-flush loses and duplicates nothing.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from agent.outbox import Outbox, reading_task_id
from agent.sensors.base import Sample
from tests.support.celery_apps import close_app
from tests.support.mosquitto import FleetPKI, MosquittoBroker

from .support import (
    enrolled_agent,
    make_persistent,
    operator_app,
    outbox_state,
    send_command,
    start_agent,
    wait_until,
)

pytestmark = pytest.mark.slow


def seqs_of(records: list[dict]) -> list[int]:
    return [r["kwargs"]["reading"]["seq"] for r in records]


def assert_once_in_order(records: list[dict], agent_id: str, upto: int) -> None:
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "a task id was executed twice"
    assert seqs_of(records) == list(range(1, upto + 1))
    assert all(r["id"] == reading_task_id(agent_id, r["kwargs"]["reading"]["seq"]) for r in records)
    assert {r["signer"] for r in records} == {agent_id}


def test_run_sends_signed_readings(tmp_path: Path, test_pki: FleetPKI, mosquitto: MosquittoBroker,
                                   receiver_factory, procs: list) -> None:
    rcv = receiver_factory(mosquitto.tls_url)
    data = enrolled_agent(test_pki, tmp_path / "agent", "run-1")
    procs.append(start_agent(data, mosquitto.tls_url, interval=0.2, env={"EDGE_AGENT_HEARTBEAT_INTERVAL": "0.5"}))
    wait_until(lambda: len(rcv.readings("run-1")) >= 5, 60, what="5 readings")
    got = rcv.readings("run-1")
    assert_once_in_order(got, "run-1", len(got))
    reading = got[0]["kwargs"]["reading"]
    assert set(reading) == {"agent_id", "sensor", "seq", "value", "unit", "sampled_at"}
    assert reading["sensor"] == "sim_temp" and reading["unit"] == "C"
    beats = wait_until(lambda: [r for r in rcv.records() if r["task"] == "edge.heartbeat"], 60, what="a heartbeat")
    status = beats[0]["kwargs"]["status"]
    assert set(status) == {"agent_id", "outbox_backlog", "unconfirmed", "dropped", "witness_alarms", "interval", "version",
                           "sent_at"}
    assert status["agent_id"] == "run-1" and status["interval"] == 0.2 and beats[0]["signer"] == "run-1"
    assert "as edge-agent-run-1 " in mosquitto.log(), "the consuming session uses the stable client id"


def test_commands_answer_over_rpc_and_are_reported(tmp_path: Path, test_pki: FleetPKI, mosquitto: MosquittoBroker,
                                                   receiver_factory, procs: list) -> None:
    rcv = receiver_factory(mosquitto.tls_url)
    data = enrolled_agent(test_pki, tmp_path / "agent", "cmd-1")
    procs.append(start_agent(data, mosquitto.tls_url, interval=3600))
    op = operator_app(test_pki, tmp_path, mosquitto.tls_url)
    try:
        assert send_command(op, "edge.agent.set_interval", "agent.cmd-1", seconds=1800) == {"interval": 1800.0}
        sampled = send_command(op, "edge.agent.sample_now", "agent.cmd-1")
        assert len(sampled) == 1 and sampled[0]["seq"] in (1, 2)  # the other one is the sample taken at start
        send_command(op, "edge.agent.status", "agent.cmd-1")  # starts tracemalloc
        status = send_command(op, "edge.agent.status", "agent.cmd-1")
        assert status["agent_id"] == "cmd-1" and status["interval"] == 1800.0 and status["rss"] > 0
        assert status["tracemalloc_top"] and "size" in status["tracemalloc_top"][0]
        with pytest.raises(Exception, match="too small"):
            send_command(op, "edge.agent.set_interval", "agent.cmd-1", seconds=0)
    finally:
        close_app(op)
    wait_until(lambda: len([r for r in rcv.records() if r["task"] == "edge.command_result"
                            and r["kwargs"]["result"]["agent_id"] == "cmd-1"]) >= 5, 60, what="5 command results")
    results = [r["kwargs"]["result"] for r in rcv.records() if r["task"] == "edge.command_result"
               and r["kwargs"]["result"]["agent_id"] == "cmd-1"]
    assert [r["command"] for r in results] == ["edge.agent.set_interval", "edge.agent.sample_now",
                                               "edge.agent.status", "edge.agent.status", "edge.agent.set_interval"]
    assert [r["status"] for r in results] == ["SUCCESS"] * 4 + ["FAILURE"]
    assert "too small" in results[-1]["result"]
    wait_until(lambda: len(rcv.readings("cmd-1")) >= 2, 60, what="2 readings")
    assert seqs_of(rcv.readings("cmd-1")) == [1, 2]
    assert sampled[0] in [r["kwargs"]["reading"] for r in rcv.readings("cmd-1")]


def test_offline_then_reconnect_delivers_everything_once_in_order(
        tmp_path: Path, test_pki: FleetPKI, fresh_mosquitto: MosquittoBroker, receiver_factory, procs: list) -> None:
    broker = make_persistent(fresh_mosquitto)  # see make_persistent: the broker keeps what it PUBACKed
    rcv = receiver_factory(broker.tls_url)
    data = enrolled_agent(test_pki, tmp_path / "agent", "off-1")
    procs.append(start_agent(data, broker.tls_url, interval=0.1))
    wait_until(lambda: len(rcv.readings("off-1")) >= 3, 60, what="first readings")
    broker.stop()
    stored_before = outbox_state(data)["next_seq"]
    wait_until(lambda: outbox_state(data)["backlog"] >= 20 and outbox_state(data)["next_seq"] >= stored_before + 20,
               60, what="readings accumulating while the broker is down")
    broker.start()  # same ports
    wait_until(lambda: outbox_state(data)["backlog"] == 0, 90, what="outbox flushed after reconnect")
    last = outbox_state(data)["next_seq"] - 1
    wait_until(lambda: len(rcv.readings("off-1")) >= last, 90, what=f"{last} readings at the receiver")
    got = rcv.readings("off-1")
    assert_once_in_order(got[:last], "off-1", last)


def test_sigkill_mid_flush_loses_and_duplicates_nothing(
        tmp_path: Path, test_pki: FleetPKI, mosquitto: MosquittoBroker, receiver_factory, procs: list) -> None:
    data = enrolled_agent(test_pki, tmp_path / "agent", "kill-1")
    total = 3000
    box = Outbox(data / "outbox.sqlite3", "kill-1")
    box.add_samples([Sample("sim_temp", float(i), "C", 1.0e9 + i) for i in range(total)])  # a long outage's backlog
    box.close()
    rcv = receiver_factory(mosquitto.tls_url)
    agent = start_agent(data, mosquitto.tls_url, interval=3600)
    procs.append(agent)
    wait_until(lambda: outbox_state(data)["backlog"] < total - 100, 60, what="flush under way")
    agent.stop(signal.SIGKILL)
    left = outbox_state(data)["backlog"]
    assert 0 < left < total, "the kill must land mid-flush"
    agent2 = start_agent(data, mosquitto.tls_url, interval=3600, log_name="agent2.log")
    procs.append(agent2)
    wait_until(lambda: outbox_state(data)["backlog"] == 0, 120, what="outbox flushed after restart")
    last = outbox_state(data)["next_seq"] - 1
    assert last == total + 2  # the two runs each sampled once at start
    wait_until(lambda: len(rcv.readings("kill-1")) >= last, 120, what=f"{last} readings at the receiver")
    assert_once_in_order(rcv.readings("kill-1"), "kill-1", last)


def test_crash_after_puback_before_delete_is_deduplicated(
        tmp_path: Path, test_pki: FleetPKI, mosquitto: MosquittoBroker, receiver_factory, procs: list) -> None:
    """The one window store-and-forward cannot close: the broker has the message but
    the agent died before deleting the row. The re-send carries the same task id, and
    the receiver refuses it as a replay: executed once."""
    from agent.app import create_app
    from agent.config import load_config

    data = enrolled_agent(test_pki, tmp_path / "agent", "dup-1")
    rcv = receiver_factory(mosquitto.tls_url)
    cfg = load_config(data, overrides={"broker_url": mosquitto.tls_url})
    app = create_app(cfg)  # the agent's own app and publish path, in this process
    box = Outbox(cfg.outbox_file, "dup-1")
    box.add_samples([Sample("sim_temp", float(i), "C", 1.0e9 + i) for i in range(5)])
    first = box.pending(1)[0]
    try:
        app.edge_runtime.publish(first)  # PUBACK received ... and the agent "dies": row stays
    finally:
        app.edge_runtime.reset_connection()
    assert box.backlog() == 5
    wait_until(lambda: len(rcv.readings("dup-1")) == 1, 60, what="the first copy")
    procs.append(start_agent(data, mosquitto.tls_url, interval=3600))
    wait_until(lambda: outbox_state(data)["backlog"] == 0, 60, what="outbox flushed")
    wait_until(lambda: len(rcv.readings("dup-1")) >= 6, 60, what="6 readings")
    wait_until(lambda: rcv.refused("replay") >= 1, 60, what="the re-sent copy refused as a replay")
    assert_once_in_order(rcv.readings("dup-1"), "dup-1", 6)


def test_commands_sent_while_the_agent_is_down_wait_for_it(
        tmp_path: Path, test_pki: FleetPKI, mosquitto: MosquittoBroker, receiver_factory, procs: list) -> None:
    """The agent's queue lives in its persistent MQTT session: a command sent while it
    is stopped runs when it comes back."""
    receiver_factory(mosquitto.tls_url)
    data = enrolled_agent(test_pki, tmp_path / "agent", "later-1")
    agent = start_agent(data, mosquitto.tls_url, interval=3600)
    procs.append(agent)
    op = operator_app(test_pki, tmp_path, mosquitto.tls_url)
    try:
        assert send_command(op, "edge.agent.status", "agent.later-1")["agent_id"] == "later-1"
        agent.stop()
        pending = op.send_task("edge.agent.set_interval", kwargs={"seconds": 42}, queue="agent.later-1", retry=False)
        procs.append(start_agent(data, mosquitto.tls_url, interval=3600, log_name="agent2.log"))
        assert pending.get(timeout=60) == {"interval": 42.0}
    finally:
        close_app(op)


def test_agent_started_while_offline_stores_then_sends(
        tmp_path: Path, test_pki: FleetPKI, fresh_mosquitto: MosquittoBroker, receiver_factory, procs: list) -> None:
    """A device that boots without network samples into its outbox from the start."""
    from .support import AGENT_TEST_ENV, Proc, agent_command

    broker = make_persistent(fresh_mosquitto)
    rcv = receiver_factory(broker.tls_url)
    data = enrolled_agent(test_pki, tmp_path / "agent", "boot-1")
    broker.stop()
    agent = Proc(agent_command(data, broker.tls_url, 0.1), tmp_path / "agent.log", env=AGENT_TEST_ENV).start()
    procs.append(agent)
    wait_until(lambda: outbox_state(data)["backlog"] >= 10, 60, what="readings stored while offline")
    broker.start()
    agent.wait_for_output("ready in", timeout=90)
    wait_until(lambda: outbox_state(data)["backlog"] == 0, 90, what="outbox flushed")
    last = outbox_state(data)["next_seq"] - 1
    wait_until(lambda: len(rcv.readings("boot-1")) >= last, 90, what=f"{last} readings")
    assert_once_in_order(rcv.readings("boot-1")[:last], "boot-1", last)


def test_commands_from_other_fleet_members_are_refused(
        tmp_path: Path, test_pki: FleetPKI, mosquitto: MosquittoBroker, receiver_factory, procs: list) -> None:
    """Only `command_signers` may command an agent: another agent's certificate is valid
    for the broker and the signature, yet its command never runs (quarantined)."""
    from security.quarantine import Quarantine

    receiver_factory(mosquitto.tls_url)
    data = enrolled_agent(test_pki, tmp_path / "agent", "guard-1")
    procs.append(start_agent(data, mosquitto.tls_url, interval=3600))
    intruder = operator_app(test_pki, tmp_path, mosquitto.tls_url, name="other-agent")
    op = operator_app(test_pki, tmp_path, mosquitto.tls_url)
    try:
        assert send_command(op, "edge.agent.status", "agent.guard-1")["interval"] == 3600.0
        intruder.send_task("edge.agent.set_interval", kwargs={"seconds": 1}, queue="agent.guard-1", retry=False)
        wait_until(lambda: Quarantine(data / "quarantine.sqlite").count("signer_not_allowed") >= 1, 60,
                   what="the intruder's command quarantined by the agent")
        assert send_command(op, "edge.agent.status", "agent.guard-1")["interval"] == 3600.0
    finally:
        close_app(intruder)
        close_app(op)
