"""Ingestion against a real journal: one transaction, exactly once per task id."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from coordinator import commands
from coordinator.ingest import COMMAND_RESULT, HEARTBEAT, INGEST, Ingestor, TaskContext
from coordinator.metrics import standard_metrics
from coordinator.registry import read_registry
from ledger.journal import Journal
from security.pki import fingerprint, load_certificate
from security.signing import SignerInfo


def signer_for(test_pki, name: str, envelope: bytes = b"{}") -> SignerInfo:
    cert_path, _ = test_pki.client(name)
    cert = load_certificate(cert_path)
    return SignerInfo(name, fingerprint(cert), hashlib.sha256(envelope).hexdigest(), envelope, cert_path.read_text())


def reading(agent: str, seq: int) -> dict:
    return {"agent_id": agent, "sensor": "temp", "seq": seq, "value": 20.5 + seq, "unit": "C", "sampled_at": time.time()}


def sent(ingestor: Ingestor, agent: str, task_id: str, command: str, args: list | None = None) -> None:
    """What `edge-coordinator send` records before publishing a command."""
    from coordinator.ingest import canonical_digest

    commands.record(ingestor.journal.path, commands.SentCommand(task_id, agent, command, canonical_digest(args or []),
                                                                time.time()))


@pytest.fixture
def ingestor(tmp_path: Path):
    journal = Journal(tmp_path / "journal.db")
    yield Ingestor(journal, standard_metrics())
    journal.close()


def ctx(task_id: str, name: str, signer: SignerInfo) -> TaskContext:
    return TaskContext(task_id=task_id, task_name=name, signer=signer, received_at=time.time())


def test_reading_stored_and_journaled_once(ingestor: Ingestor, test_pki) -> None:
    s = signer_for(test_pki, "ing-a", b'{"signed": 1}')
    first = ingestor.run(ctx("t-1", INGEST, s), reading("ing-a", 1))
    again = ingestor.run(ctx("t-1", INGEST, s), reading("ing-a", 1))  # redelivery
    assert first == {"status": "SUCCESS", "duplicate": False}
    assert again["duplicate"] is True
    db = ingestor.journal.db
    assert db["readings"].count == 1
    row = ingestor.journal.get("t-1")
    assert row["agent_id"] == "ing-a" and row["status"] == "SUCCESS" and row["anchor_state"] == "pending"
    assert row["envelope"] == b'{"signed": 1}' and row["signer_fingerprint"] == s.fingerprint
    assert ingestor.journal.certificate(s.fingerprint) == s.certificate_pem
    m = ingestor.metrics
    assert m.get("edgeledger_tasks_executed_total", task=INGEST) == 1
    assert m.get("edgeledger_tasks_duplicate_total", task=INGEST) == 1
    reg = read_registry(ingestor.journal.path)
    assert reg["ing-a"]["readings"] == 1 and reg["ing-a"]["last_seq"] == 1


def test_identity_mismatch_is_journaled_as_rejected_not_stored(ingestor: Ingestor, test_pki) -> None:
    s = signer_for(test_pki, "ing-b")
    out = ingestor.run(ctx("t-2", INGEST, s), reading("someone-else", 1))
    assert out["status"] == "REJECTED" and out["reason"] == "identity_mismatch"
    assert ingestor.journal.db["readings"].count == 0
    row = ingestor.journal.get("t-2")
    assert row["status"] == "REJECTED" and row["agent_id"] == "ing-b"
    assert ingestor.metrics.get("edgeledger_tasks_refused_total", reason="identity_mismatch") == 1


def test_same_seq_under_new_task_id_is_rejected(ingestor: Ingestor, test_pki) -> None:
    s = signer_for(test_pki, "ing-c")
    assert ingestor.run(ctx("t-3", INGEST, s), reading("ing-c", 7))["status"] == "SUCCESS"
    out = ingestor.run(ctx("t-4", INGEST, s), reading("ing-c", 7))
    assert out["reason"] == "duplicate_seq"
    assert ingestor.journal.db["readings"].count == 1


def test_bad_payload_rejected(ingestor: Ingestor, test_pki) -> None:
    s = signer_for(test_pki, "ing-d")
    bad = reading("ing-d", 1) | {"value": "hot"}
    assert ingestor.run(ctx("t-5", INGEST, s), bad)["reason"] == "bad_payload"


def test_heartbeat_and_command_result_update_registry(ingestor: Ingestor, test_pki) -> None:
    s = signer_for(test_pki, "ing-e")
    hb = {"agent_id": "ing-e", "outbox_backlog": 42, "interval": 2.0, "version": "0.1.0", "sent_at": time.time()}
    assert ingestor.run(ctx("h-1", HEARTBEAT, s), hb)["status"] == "SUCCESS"
    sent(ingestor, "ing-e", "c-1", "edge.agent.status")  # a command_result must answer a command really sent
    res = {"agent_id": "ing-e", "command_task_id": "c-1", "command": "edge.agent.status", "status": "SUCCESS",
           "result": {"ok": True}, "finished_at": time.time()}
    assert ingestor.run(ctx("r-1", COMMAND_RESULT, s), res)["status"] == "SUCCESS"
    reg = read_registry(ingestor.journal.path)["ing-e"]
    assert reg["outbox_backlog"] == 42 and reg["version"] == "0.1.0" and reg["last_task"] == COMMAND_RESULT
    assert ingestor.journal.db["command_results"].get("r-1")["command_task_id"] == "c-1"


def command_result(agent: str, command_task_id: str, command: str, status: str = "SUCCESS", result=None) -> dict:
    return {"agent_id": agent, "command_task_id": command_task_id, "command": command, "status": status,
            "result": result, "finished_at": time.time()}


def test_command_result_for_a_command_never_sent_is_rejected(ingestor: Ingestor, test_pki) -> None:
    s = signer_for(test_pki, "ing-f")
    out = ingestor.run(ctx("r-2", COMMAND_RESULT, s), command_result("ing-f", "never-sent", "edge.agent.status"))
    assert (out["status"], out["reason"]) == ("REJECTED", "unknown_command")
    assert ingestor.journal.get("r-2")["status"] == "REJECTED"
    assert ingestor.journal.db["command_results"].count == 0
    assert ingestor.metrics.get("edgeledger_tasks_refused_total", reason="unknown_command") == 1


def test_command_result_must_come_from_the_commanded_agent_and_name_its_command(ingestor: Ingestor, test_pki) -> None:
    sent(ingestor, "ing-g", "c-7", "edge.agent.set_interval", [5])
    other = signer_for(test_pki, "ing-h")
    out = ingestor.run(ctx("r-3", COMMAND_RESULT, other), command_result("ing-h", "c-7", "edge.agent.set_interval"))
    assert (out["status"], out["reason"]) == ("REJECTED", "unknown_command")
    s = signer_for(test_pki, "ing-g")
    out = ingestor.run(ctx("r-4", COMMAND_RESULT, s), command_result("ing-g", "c-7", "edge.agent.sample_now"))
    assert (out["status"], out["reason"]) == ("REJECTED", "unknown_command")
    assert ingestor.journal.db["command_results"].count == 0


def test_failed_command_is_journaled_as_failure_with_its_command_and_args_digest(ingestor: Ingestor, test_pki) -> None:
    from coordinator.ingest import canonical_digest

    sent(ingestor, "ing-i", "c-8", "edge.agent.set_interval", ["abc"])
    s = signer_for(test_pki, "ing-i")
    res = command_result("ing-i", "c-8", "edge.agent.set_interval", "FAILURE", "ValueError('abc')")
    assert ingestor.run(ctx("r-5", COMMAND_RESULT, s), res)["status"] == "FAILURE"
    assert ingestor.journal.get("r-5")["status"] == "FAILURE"
    row = ingestor.journal.db["command_results"].get("r-5")
    assert (row["command"], row["status"], row["args_digest"]) == (
        "edge.agent.set_interval", "FAILURE", canonical_digest(["abc"]))
