"""Agents as witnesses, fast layer: a real journal, ingestor, checkpointer and receipt book
in process (the coordinator side), and the agent's outbox + witness over a temp dir."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from agent.outbox import Outbox
from agent.sensors.base import Sample
from agent.witness import Witness, WitnessAlarm, read_status
from coordinator.ingest import COSIGN, INGEST, Ingestor, TaskContext
from coordinator.metrics import standard_metrics
from coordinator.receipts import MAX_PROOFS, ReceiptBook
from ledger.checkpointer import Checkpointer
from ledger.journal import Journal
from ledger.tlog.cosignature import CosignatureV1Verifier, open_cosigned_checkpoint
from ledger.tlog.note import Ed25519Signer
from security.contract import cosign_task_id, reading_task_id
from security.pki import fingerprint, load_certificate
from security.policy import TaskMessage, coordinator_policy
from security.signing import SignerInfo

ORIGIN = "edgeledger/0000000000000000/coordinator"


class Coordinator:
    """The coordinator's side, in process: journal + ingest + checkpoints + receipts."""

    def __init__(self, path: Path, key: Ed25519Signer) -> None:
        self.journal = Journal(path)
        self.book = ReceiptBook(path)
        self.ingestor = Ingestor(self.journal, standard_metrics(), on_reading=self.book.note)
        self.checkpointer = Checkpointer(self.journal, key)
        self.journal.set_config(log_origin=key.name, log_vkey=key.verifier().vkey)

    def run(self, signer: SignerInfo, name: str, task_id: str, payload: dict) -> dict:
        ctx = TaskContext(task_id=task_id, task_name=name, signer=signer, received_at=time.time())
        return self.ingestor.run(ctx, payload)

    def ingest(self, signer: SignerInfo, readings: Iterable[dict]) -> None:
        for r in readings:
            assert self.run(signer, INGEST, reading_task_id(signer.agent_id, r["seq"]), r)["status"] == "SUCCESS"

    def receipt(self) -> dict:
        self.checkpointer.checkpoint()
        (receipt,) = self.book.take()
        return receipt

    def cosign(self, signer: SignerInfo, payload: dict) -> dict:
        return self.run(signer, COSIGN, cosign_task_id(signer.agent_id, payload["size"]), payload)


class Device:
    """The agent's side: its outbox and witness (what AgentRuntime.apply_receipt drives)."""

    def __init__(self, home: Path, agent_id: str) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.box = Outbox(home / "outbox.sqlite3", agent_id)
        self.witness = Witness(home, agent_id, self.box.db)

    def sample(self, n: int) -> list[dict]:
        readings = self.box.add_samples([Sample("t", 20.0 + i / 10, "C", 1.7e9 + i) for i in range(n)])
        for item in self.box.pending(limit=10_000):
            self.box.mark_sent(item.id, awaits_receipt=True)
        return readings

    def apply(self, receipt: dict):
        ranges = [tuple(r) for r in receipt["held"]]
        confirmed = self.box.stored_seqs(receipt["upto"], ranges)
        verdict = self.witness.check(receipt["checkpoint"], self.box.readings(confirmed))
        assert verdict is not None
        self.witness.track_unproven(confirmed, receipt["checkpoint"], verdict, receipt["upto"], ranges)
        self.box.confirm_seqs(sorted(set(confirmed) & verdict.proven), receipt["upto"])
        return verdict

    def left(self) -> int:
        return self.box.backlog() + self.box.unconfirmed()


@pytest.fixture
def log_key() -> Ed25519Signer:
    return Ed25519Signer.generate(ORIGIN)


@pytest.fixture
def signer(test_pki) -> SignerInfo:
    cert_path, _ = test_pki.client("w-a")
    cert = load_certificate(cert_path)
    return SignerInfo("w-a", fingerprint(cert), hashlib.sha256(b"{}").hexdigest(), b"{}", cert_path.read_text())


def test_normal_run_proves_every_reading_then_cosigns_and_the_journal_keeps_it(
        tmp_path: Path, log_key: Ed25519Signer, signer: SignerInfo) -> None:
    coord, dev = Coordinator(tmp_path / "journal.db", log_key), Device(tmp_path / "w-a", "w-a")
    coord.ingest(signer, dev.sample(5))
    receipt = coord.receipt()
    part = receipt["checkpoint"]
    assert part["consistency"] is None and len(part["proofs"]) == 5  # first checkpoint: trust on first use
    verdict = dev.apply(receipt)
    assert verdict.proven == {1, 2, 3, 4, 5} and dev.left() == 0
    assert (dev.home / "log.pub").read_text().strip() == log_key.verifier().vkey  # pinned on first use
    assert coord.cosign(signer, verdict.cosignature)["status"] == "SUCCESS"
    size = verdict.accepted_size
    (stored,) = coord.journal.cosignatures(size)
    witness = CosignatureV1Verifier.from_vkey(stored["vkey"])
    assert witness.name == "witness/w-a"
    note = coord.journal.cosigned_note(size, coord.journal.latest_checkpoint()["note"])
    assert open_cosigned_checkpoint(note, log_key.verifier(), [witness], 1).cosigned_at.keys() == {"witness/w-a"}

    # the next receipt proves the consistency from the cosigned size, and the new readings
    coord.ingest(signer, dev.sample(3))
    receipt = coord.receipt()
    assert receipt["checkpoint"]["consistency"]["from"] == size
    verdict = dev.apply(receipt)
    assert verdict.proven == {6, 7, 8} and dev.left() == 0 and verdict.accepted_size > size
    assert read_status(dev.box.db, dev.home)["accepted_size"] == verdict.accepted_size


def test_proofs_per_receipt_are_bounded_and_the_rest_come_in_the_next_receipt(
        tmp_path: Path, log_key: Ed25519Signer, signer: SignerInfo) -> None:
    coord, dev = Coordinator(tmp_path / "journal.db", log_key), Device(tmp_path / "w-a", "w-a")
    coord.ingest(signer, dev.sample(MAX_PROOFS + 10))
    first = coord.receipt()
    assert first["upto"] == MAX_PROOFS + 10 and len(first["checkpoint"]["proofs"]) == MAX_PROOFS
    verdict = dev.apply(first)
    assert dev.left() == 10  # confirmed but not yet proven: kept (and re-sent if no proof comes)
    assert coord.book.wake.is_set()  # a backlog: the next receipt does not wait for the interval
    coord.cosign(signer, verdict.cosignature)
    (second,) = coord.book.take()  # same checkpoint, the next proofs
    assert sorted(p["seq"] for p in second["checkpoint"]["proofs"]) == list(range(MAX_PROOFS + 1, MAX_PROOFS + 11))
    dev.apply(second)
    assert dev.left() == 0 and not coord.book.wake.is_set() and coord.book.take() == []


def rewritten(path: Path, log_key: Ed25519Signer, signer: SignerInfo, readings: list[dict]) -> Coordinator:
    """A second journal under the SAME log key whose history differs (an edited reading)."""
    coord = Coordinator(path, log_key)
    forged = [dict(r, value=r["value"] + 100.0) if r["seq"] == 2 else r for r in readings]
    coord.ingest(signer, forged)
    return coord


def alarms(dev: Device) -> list[tuple[str, str | None, str | None]]:
    return dev.box.db.execute("SELECT kind, accepted, presented FROM witness_alarm ORDER BY id").fetchall()


def test_a_rewritten_history_is_refused_with_evidence_and_readings_kept(
        tmp_path: Path, log_key: Ed25519Signer, signer: SignerInfo) -> None:
    coord, dev = Coordinator(tmp_path / "journal.db", log_key), Device(tmp_path / "w-a", "w-a")
    first = dev.sample(4)
    coord.ingest(signer, first)
    verdict = dev.apply(coord.receipt())
    accepted = dev.witness.accepted()
    # the operator rebuilds the log with reading 2 edited and re-signs it with the same key;
    # the agent's cosignature of the honest size survives in the rewritten journal
    fork = rewritten(tmp_path / "fork.db", log_key, signer, first)
    fork.checkpointer.checkpoint()
    fork.journal.add_cosignature(fork.journal.db, verdict.accepted_size, "w-a", "v", "l", "t")
    more = dev.sample(2)
    fork.ingest(signer, more)
    receipt = fork.receipt()
    assert receipt["checkpoint"]["consistency"]["from"] == verdict.accepted_size
    with pytest.raises(WitnessAlarm) as refused:
        dev.apply(receipt)
    assert refused.value.kind == "checkpoint_inconsistent"
    assert dev.left() == 2  # readings 5 and 6 stay in the outbox
    assert dev.witness.accepted() == accepted  # the honest checkpoint stays the agent's
    ((kind, old, new),) = alarms(dev)
    assert kind == "checkpoint_inconsistent" and old == accepted and new == receipt["checkpoint"]["note"]
    files = list((dev.home / "witness-evidence").glob("*-checkpoint_inconsistent.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["evidence"]["consistency"]
    status = read_status(dev.box.db, dev.home)
    assert status["alarms"] == 1 and status["last_alarm"]["kind"] == "checkpoint_inconsistent"
    with pytest.raises(WitnessAlarm):
        dev.apply(receipt)  # the same bad checkpoint again: refused again, evidence kept once
    assert len(alarms(dev)) == 1


def test_same_size_other_root_is_a_fork(tmp_path: Path, log_key: Ed25519Signer, signer: SignerInfo) -> None:
    coord, dev = Coordinator(tmp_path / "journal.db", log_key), Device(tmp_path / "w-a", "w-a")
    readings = dev.sample(3)
    coord.ingest(signer, readings)
    dev.apply(coord.receipt())
    fork = rewritten(tmp_path / "fork.db", log_key, signer, readings)
    receipt = fork.receipt()
    with pytest.raises(WitnessAlarm) as refused:
        dev.witness.check(receipt["checkpoint"], {})
    assert refused.value.kind == "checkpoint_fork"


def test_smaller_checkpoint_and_other_log_key_are_refused(tmp_path: Path, log_key: Ed25519Signer,
                                                          signer: SignerInfo) -> None:
    coord, dev = Coordinator(tmp_path / "journal.db", log_key), Device(tmp_path / "w-a", "w-a")
    readings = dev.sample(3)
    coord.ingest(signer, readings)
    dev.apply(coord.receipt())
    shorter = Coordinator(tmp_path / "short.db", log_key)
    shorter.ingest(signer, readings[:2])
    with pytest.raises(WitnessAlarm) as refused:
        dev.witness.check(shorter.receipt()["checkpoint"], {})
    assert refused.value.kind == "checkpoint_shrunk"
    other = Coordinator(tmp_path / "other.db", Ed25519Signer.generate(ORIGIN))
    other.ingest(signer, readings)
    part = other.receipt()["checkpoint"]
    with pytest.raises(WitnessAlarm) as refused:
        dev.witness.check(part, {})
    assert refused.value.kind == "log_key_changed"
    with pytest.raises(WitnessAlarm) as refused:
        dev.witness.check(dict(part, log_key=None), {})  # not even named: the signature fails
    assert refused.value.kind == "checkpoint_signature_invalid"


def test_a_confirmed_reading_whose_leaf_is_not_its_reading_raises_an_alarm(
        tmp_path: Path, log_key: Ed25519Signer, signer: SignerInfo) -> None:
    coord, dev = Coordinator(tmp_path / "journal.db", log_key), Device(tmp_path / "w-a", "w-a")
    readings = dev.sample(3)
    coord.ingest(signer, [dict(r, value=99.0) if r["seq"] == 3 else r for r in readings])  # journaled another value
    receipt = coord.receipt()
    with pytest.raises(WitnessAlarm) as refused:
        dev.apply(receipt)
    assert refused.value.kind == "reading_not_in_log" and "seq 3" in refused.value.detail
    assert dev.left() == 3 and dev.witness.accepted() is None  # nothing deleted, nothing accepted


def test_cosignatures_that_do_not_verify_or_name_no_checkpoint_are_rejected(
        tmp_path: Path, log_key: Ed25519Signer, signer: SignerInfo) -> None:
    coord, dev = Coordinator(tmp_path / "journal.db", log_key), Device(tmp_path / "w-a", "w-a")
    coord.ingest(signer, dev.sample(2))
    good = dev.apply(coord.receipt()).cosignature
    unknown = coord.cosign(signer, dict(good, size=good["size"] + 7))  # (the policy binds the id to the size)
    assert unknown["status"] == "REJECTED" and unknown["reason"] == "unknown_checkpoint"
    other = Device(tmp_path / "w-b", "w-b").witness.signer().verifier().vkey  # someone else's witness key
    wrong_name = coord.run(signer, COSIGN, "y-" + cosign_task_id("w-a", good["size"]), dict(good, witness_key=other))
    assert wrong_name["status"] == "REJECTED" and wrong_name["reason"] == "cosignature_invalid"
    assert coord.journal.cosignatures(good["size"]) == []
    assert coord.ingestor.metrics.get("edgeledger_tasks_refused_total", reason="cosignature_invalid") == 1
    tampered = dict(good, cosignature=good["cosignature"][:-6] + ("A" if good["cosignature"][-6] != "A" else "B")
                    + good["cosignature"][-5:])
    bad = coord.run(signer, COSIGN, "x-" + cosign_task_id("w-a", good["size"]), tampered)
    assert bad["status"] == "REJECTED" and bad["reason"] == "cosignature_invalid"
    assert coord.cosign(signer, good)["status"] == "SUCCESS"
    assert [c["agent_id"] for c in coord.journal.cosignatures(good["size"])] == ["w-a"]


def test_the_cosign_task_is_allowed_only_under_its_contract_id() -> None:
    policy = coordinator_policy()
    payload = {"cosignature": {"agent_id": "w-a", "size": 9}}
    ok = TaskMessage(task="edge.witness.cosign", task_id=cosign_task_id("w-a", 9), signer="w-a", kwargs=payload)
    assert policy.check(ok) is None
    squat = TaskMessage(task="edge.witness.cosign", task_id=cosign_task_id("w-b", 9), signer="w-a", kwargs=payload)
    refusal = policy.check(squat)
    assert refusal is not None and refusal.reason == "id_not_bound"


def test_status_reads_an_outbox_from_before_witnessing(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.sqlite3")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    assert read_status(db, tmp_path) == {"log_key": None, "accepted_size": None, "alarms": 0, "last_alarm": None}


def test_audit_counts_each_witness_up_to_the_largest_checkpoint_it_cosigned(
        tmp_path: Path, log_key: Ed25519Signer, signer: SignerInfo, test_pki) -> None:
    from ledger import witnesses as wit

    coord = Coordinator(tmp_path / "journal.db", log_key)
    cert_b, _ = test_pki.client("w-b")
    signer_b = SignerInfo("w-b", fingerprint(load_certificate(cert_b)), signer.envelope_digest, b"{}", cert_b.read_text())
    dev_a, dev_b = Device(tmp_path / "w-a", "w-a"), Device(tmp_path / "w-b", "w-b")
    coord.ingest(signer, dev_a.sample(2))
    coord.ingest(signer_b, dev_b.sample(2))
    coord.checkpointer.checkpoint()
    receipts = {r["agent_id"]: r for r in coord.book.take()}
    first = dev_a.apply(receipts["w-a"]).cosignature
    coord.cosign(signer, first)  # w-a cosigns the first checkpoint only
    coord.ingest(signer_b, dev_b.sample(1))
    assert dev_b.apply(receipts["w-b"]).cosignature["size"] == first["size"]  # lost on its way: never sent
    resent = dev_b.apply(coord.receipt())  # no proof from w-b's accepted size: nothing accepted, cosignature re-sent
    assert resent.proven == set() and resent.cosignature["size"] == first["size"] and dev_b.left() == 1
    coord.cosign(signer_b, resent.cosignature)
    coord.ingest(signer_b, dev_b.box.readings([3]).values())  # the agent re-sends what is still unproven
    coord.ingest(signer_b, dev_b.sample(1))
    second = dev_b.apply(coord.receipt()).cosignature
    assert dev_b.left() == 0
    coord.journal.db.conn.execute("DELETE FROM tlog_cosignature WHERE agent_id = 'w-b'")
    coord.cosign(signer_b, dict(second, sent_at=second["sent_at"]))  # w-b's cosignature: the larger one only
    assert second["size"] > first["size"]
    keys = [wit.Witness(d.witness.signer().name, d.witness.signer().verifier()) for d in (dev_a, dev_b)]
    notes = {c["size"]: c["note"] for c in coord.journal.checkpoints()}
    reached = wit.reach(keys, coord.journal.all_cosignatures(), notes)
    assert reached == {"witness/w-a": first["size"], "witness/w-b": second["size"]}
    assert wit.witnessed_size(reached, 2) == first["size"] and wit.witnessed_size(reached, 1) == second["size"]
    assert wit.witnessed_size({"witness/w-a": first["size"]}, 2) == 0  # one witness: no quorum of two
    # a cosignature line moved to another checkpoint does not count there
    moved = [{"size": second["size"], "line": first["cosignature"]}]
    assert wit.reach(keys, moved, notes) == {}


def withheld(receipt: dict, seq: int) -> dict:
    """The receipt with `seq`'s inclusion proof left out (a coordinator that never logged it or hides it)."""
    part = receipt["checkpoint"]
    return dict(receipt, checkpoint=dict(part, proofs=[p for p in part["proofs"] if p["seq"] != seq]))


def apply_and_cosign(coord: Coordinator, dev: Device, signer: SignerInfo, receipt: dict):
    """What the running agent does: apply the receipt, send the cosignature it queued."""
    verdict = dev.apply(receipt)
    if verdict.cosignature is not None:
        assert coord.cosign(signer, verdict.cosignature)["status"] == "SUCCESS"
    return verdict


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_reading_confirmed_but_never_proven_raises_one_alarm_after_the_bound_and_is_kept(
        tmp_path: Path, log_key: Ed25519Signer, signer: SignerInfo) -> None:
    from agent.witness import UNPROVEN_MISSES

    coord, dev = Coordinator(tmp_path / "journal.db", log_key), Device(tmp_path / "w-a", "w-a")
    clock = dev.witness.clock = Clock(1000.0)
    dev.witness.proof_timeout = 300.0
    coord.ingest(signer, dev.sample(3))
    first = withheld(coord.receipt(), 2)
    assert first["upto"] == 3  # the coordinator confirms reading 2 ...
    assert apply_and_cosign(coord, dev, signer, first).proven == {1, 3}  # ... but never proves it
    first_size = dev.witness.accepted() and int(dev.witness.accepted().split("\n")[1])
    for round_ in range(1, 9):  # one receipt a minute, each with a newer checkpoint that must cover seq 2
        clock.now += 60.0
        coord.ingest(signer, dev.sample(1))
        apply_and_cosign(coord, dev, signer, withheld(coord.receipt(), 2))
        expected = 1 if round_ >= 6 else 0  # 300 s after the first miss (round 1), and >= UNPROVEN_MISSES misses
        assert round_ < UNPROVEN_MISSES or len(alarms(dev)) == expected, round_
        assert set(dev.box.readings([2])) == {2}  # never deleted
    ((kind, _, presented),) = alarms(dev)  # raised once for the reading, not on every receipt after
    assert kind == "reading_unproven" and presented is not None
    evidence = json.loads(dev.box.db.execute("SELECT evidence FROM witness_alarm").fetchone()[0])
    (reading,) = evidence["readings"]
    assert reading["seq"] == 2 and reading["first_confirmed_at"] == 1000.0 and reading["first_upto"] == 3
    assert reading["first_checkpoint_size"] == first_size and reading["misses"] == 6
    assert reading["first_miss_at"] == 1060.0
    assert [r["size"] for r in reading["receipts_since"]] == sorted(r["size"] for r in reading["receipts_since"])
    assert all(r["size"] > first_size and r["upto"] >= 3 for r in reading["receipts_since"])
    status = read_status(dev.box.db, dev.home)
    assert status["alarms"] == 1 and status["last_alarm"]["kind"] == "reading_unproven"
    assert dev.left() == 1  # only reading 2: every other reading was proven and deleted
    # should the proof come after all, the reading leaves normally
    coord.ingest(signer, dev.box.readings([2]).values())  # the agent re-sends it: noted and proven again
    assert 2 in apply_and_cosign(coord, dev, signer, coord.receipt()).proven and dev.left() == 0
    assert dev.box.db.execute("SELECT COUNT(*) FROM witness_unproven").fetchone()[0] == 0


def test_a_healthy_backlog_proven_over_several_receipts_raises_no_alarm(
        tmp_path: Path, log_key: Ed25519Signer, signer: SignerInfo) -> None:
    coord, dev = Coordinator(tmp_path / "journal.db", log_key), Device(tmp_path / "w-a", "w-a")
    clock = dev.witness.clock = Clock(1000.0)
    dev.witness.proof_timeout = 1.0  # time alone never fires: only receipts that should have proven it count
    coord.ingest(signer, dev.sample(3 * MAX_PROOFS + 5))
    unproven_after_first = None
    for round_ in range(5):  # a new reading arrives between receipts: each has a newer checkpoint
        receipt = coord.receipt()
        clock.now += 1000.0
        proven = apply_and_cosign(coord, dev, signer, receipt).proven
        assert round_ >= 3 or len(proven) == MAX_PROOFS  # full receipts: the rest wait, and that is no miss
        if unproven_after_first is None:
            unproven_after_first = dev.left()
        if round_ < 4:
            coord.ingest(signer, dev.sample(1))
    assert unproven_after_first == 2 * MAX_PROOFS + 5  # confirmed, waiting for later receipts' proofs
    assert dev.left() == 0 and alarms(dev) == []
    assert read_status(dev.box.db, dev.home)["alarms"] == 0


def test_a_receipt_whose_checkpoint_is_not_newer_does_not_count_against_a_reading(
        tmp_path: Path, log_key: Ed25519Signer, signer: SignerInfo) -> None:
    """A reading journaled after the newest checkpoint is confirmed but cannot be proven yet."""
    coord, dev = Coordinator(tmp_path / "journal.db", log_key), Device(tmp_path / "w-a", "w-a")
    clock = dev.witness.clock = Clock(1000.0)
    dev.witness.proof_timeout = 1.0
    coord.ingest(signer, dev.sample(2))
    apply_and_cosign(coord, dev, signer, coord.receipt())
    coord.ingest(signer, dev.sample(1))  # seq 3, not under any checkpoint yet
    for _ in range(5):
        (receipt,) = coord.book.take()  # the same checkpoint: no checkpoint was taken since
        clock.now += 1000.0
        verdict = apply_and_cosign(coord, dev, signer, receipt)
        assert 3 not in verdict.proven and alarms(dev) == []
        coord.book.renotify("w-a")
    assert set(dev.box.readings([3])) == {3}


def test_a_coordinator_restart_mid_backlog_raises_no_alarm_once_the_readings_are_re_sent(
        tmp_path: Path, log_key: Ed25519Signer, signer: SignerInfo) -> None:
    """The restarted coordinator forgot which readings it still had to prove: its receipts miss
    them until the agent re-sends them (within resend_after), well inside the bound."""
    coord, dev = Coordinator(tmp_path / "journal.db", log_key), Device(tmp_path / "w-a", "w-a")
    clock = dev.witness.clock = Clock(1000.0)
    dev.witness.proof_timeout = 300.0
    coord.ingest(signer, dev.sample(2 * MAX_PROOFS + 5))
    apply_and_cosign(coord, dev, signer, coord.receipt())
    clock.now += 5000.0  # confirmed long ago, waiting behind the backlog: that wait does not count
    coord = Coordinator(tmp_path / "journal.db", log_key)  # restart: its receipt book starts empty
    for round_ in range(1, 5):  # (64 proofs per receipt: the re-sent ones take rounds 3 and 4)
        coord.ingest(signer, dev.sample(1))
        clock.now += 60.0
        apply_and_cosign(coord, dev, signer, coord.receipt())  # proves only the new reading: a miss for the rest
        if round_ == 2:  # resend_after later the agent re-sends what is still unproven
            coord.ingest(signer, dev.box.readings(list(range(MAX_PROOFS + 1, 2 * MAX_PROOFS + 6))).values())
    assert dev.left() == 0 and alarms(dev) == []
    assert dev.box.db.execute("SELECT COUNT(*) FROM witness_unproven").fetchone()[0] == 0
