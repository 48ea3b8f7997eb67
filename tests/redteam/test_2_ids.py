"""Attacks on identity bindings: task ids derived from another agent's identity,
payloads claiming another agent, a victim's own envelope replayed, oversize bodies.
The victim B is a real `edge-agent run`; the harm to look for is a lost reading."""

from __future__ import annotations

import uuid

import pytest

from .attacker import INGEST_TOPIC, derived_id, replay
from .fleet import ATTACKER, VICTIM, VICTIM_INTERVAL, Fleet, settle

pytestmark = pytest.mark.slow

SQUATS = 6


def test_squatting_the_victims_next_task_ids_loses_none_of_its_readings(fleet: Fleet) -> None:
    """A sends readings under B's next derived ids (uuid5 of "B/reading/<seq>"): half of
    them A's own reading, half a copy claiming to be B's. All refused id_not_bound; B's
    real readings with those seqs are all stored under B."""
    a = fleet.attacker()
    before = fleet.refusals("id_not_bound")
    ahead = int(2.0 / VICTIM_INTERVAL) + 2  # seqs B reaches only after the squats landed
    start = fleet.victim.next_seq()
    first = start + ahead
    seqs = list(range(first, first + SQUATS))
    squatted = {}
    for i, seq in enumerate(seqs):
        claimed = ATTACKER if i % 2 == 0 else VICTIM
        own_seq = 3_000_000 + uuid.uuid4().int % 1_000_000
        msg = a.reading_task(seq if claimed == VICTIM else own_seq, claimed=claimed,
                             task_id=derived_id(VICTIM, "reading", seq))
        squatted[seq] = msg["headers"]["id"]
        assert a.publish(INGEST_TOPIC, msg) == 0
    # the harm first: every reading of B up to past the squatted seqs reaches the journal
    last = seqs[-1]
    settle(fleet, lambda: fleet.victim.next_seq() > last + 1, 60, f"{VICTIM} sampling past seq {last}")
    try:
        stored = fleet.victim_lossless(since=start, timeout=45)
    except AssertionError as exc:
        owners = {seq: fleet.reading_owner(tid) for seq, tid in squatted.items()}
        raise AssertionError(f"{VICTIM} lost readings to the squatter: rows under its ids {owners}\n{exc}") from None
    assert stored >= last - start + 1
    assert {seq: fleet.reading_owner(tid) for seq, tid in squatted.items()} == {s: [(VICTIM, s)] for s in seqs}
    # and the squats were refused before execution (the id's journal row is B's own)
    reasons = {}
    for seq, tid in squatted.items():
        signed_by_attacker = [r for r in fleet.quarantined(tid) if r.signer == ATTACKER]
        reasons[seq] = [r.reason for r in signed_by_attacker]
    assert reasons == {s: ["id_not_bound"] for s in seqs}
    assert {seq: fleet.executions(tid) for seq, tid in squatted.items()} == {s: [("SUCCESS", VICTIM)] for s in seqs}
    assert fleet.refusals("id_not_bound") == before + SQUATS


def test_claiming_the_victims_agent_id_is_journaled_rejected(fleet: Fleet) -> None:
    """A's correctly bound message (A's own derived id) whose reading says agent_id=B."""
    a = fleet.attacker()
    seq = 10**9 + uuid.uuid4().int % 10**6  # a seq B will never reach during the run
    msg = a.reading_task(seq, claimed=VICTIM)
    tid = msg["headers"]["id"]
    assert a.publish(INGEST_TOPIC, msg) == 0
    settle(fleet, lambda: fleet.executions(tid), 45, "the impersonating reading journaled")
    assert fleet.executions(tid) == [("REJECTED", ATTACKER)]
    assert [r.reason for r in fleet.quarantined(tid)] == ["identity_mismatch"]
    assert fleet.coordinator.query("SELECT COUNT(*) FROM readings WHERE agent_id = ? AND seq = ?",
                                   (VICTIM, seq)) == [(0,)]


def test_victims_envelope_replayed_by_the_attacker_is_refused(fleet: Fleet) -> None:
    """A obtained one of B's signed messages (say, from a journal export) and sends it again."""
    rows = fleet.coordinator.query(
        "SELECT e.task_id, e.envelope FROM executions e JOIN readings r ON r.task_id = e.task_id "
        "WHERE r.agent_id = ? ORDER BY e.id DESC LIMIT 1", (VICTIM,))
    assert rows, "no journaled reading of the victim to replay"
    tid, envelope = rows[0]
    a = fleet.attacker()
    since = fleet.last_quarantine_id()
    assert a.publish(INGEST_TOPIC, replay(bytes(envelope))) == 0
    settle(fleet, lambda: [r for r in fleet.quarantined(tid) if r.id > since], 45, "the replay quarantined")
    assert [r.reason for r in fleet.quarantined(tid) if r.id > since] == ["replay"]
    assert fleet.executions(tid) == [("SUCCESS", VICTIM)]


def test_oversize_message_is_refused_before_anything_else(fleet: Fleet) -> None:
    a = fleet.attacker()
    msg = a.task("edge.ingest", {"reading": {"agent_id": ATTACKER, "pad": "x" * 300_000}},
                 task_id=derived_id(ATTACKER, "reading", 4_000_000 + uuid.uuid4().int % 10**6))
    tid = msg["headers"]["id"]
    assert a.publish(INGEST_TOPIC, msg) == 0
    settle(fleet, lambda: fleet.quarantined(tid), 45, "the oversize message quarantined")
    assert [r.reason for r in fleet.quarantined(tid)] == ["oversize"]
    assert fleet.executions(tid) == []
