"""ResultGuard alone, with a fake verifier: the decision table of which results a caller takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from security.result_guard import ResultGuard
from security.signing import SignatureRefused


@dataclass
class FakeSigner:
    agent_id: str
    envelope_digest: str = "d" * 64


@dataclass
class FakeVerified:
    signer: FakeSigner
    kind: str = "data"


@dataclass
class Recorder:
    refusals: list[tuple[str, str | None, Any]] = field(default_factory=list)

    def __call__(self, exc: SignatureRefused, raw: Any, *, headers: dict, signer: str | None) -> None:
        self.refusals.append((exc.reason, signer, headers.get("id")))


def admit(guard: ResultGuard, rec: Recorder, signer: str, task_id: str, status: str = "SUCCESS",
          kind: str = "data", correlation_id: str | None = None) -> bool:
    meta = {"task_id": task_id, "status": status, "result": 1}
    return guard.admit(meta, b"raw", correlation_id, verify=lambda raw: FakeVerified(FakeSigner(signer), kind), record=rec)


def test_only_the_commanded_signer_answers_once() -> None:
    guard, rec = ResultGuard(), Recorder()
    guard.expect("t1", "agent-a")
    guard.sent("t1")  # on_task_call after expect keeps the binding
    assert not admit(guard, rec, "agent-b", "t1")
    assert admit(guard, rec, "agent-a", "t1")
    assert not admit(guard, rec, "agent-a", "t1")  # the same answer again
    assert not admit(guard, rec, "agent-b", "t1")
    assert rec.refusals == [("result_unbound", "agent-b", "t1"), ("result_replay", "agent-a", "t1"),
                            ("result_replay", "agent-b", "t1")]


def test_intermediate_states_do_not_close_the_task() -> None:
    guard, rec = ResultGuard(), Recorder()
    guard.expect("t2", "agent-a")
    assert admit(guard, rec, "agent-a", "t2", status="STARTED")
    assert admit(guard, rec, "agent-a", "t2", status="FAILURE")
    assert not admit(guard, rec, "agent-a", "t2", status="SUCCESS")
    assert [r[0] for r in rec.refusals] == ["result_replay"]


def test_results_for_tasks_not_sent_or_mislabelled_are_unbound() -> None:
    guard, rec = ResultGuard(), Recorder()
    guard.sent("t3")  # sent without a binding: any verified fleet signer
    assert not admit(guard, rec, "agent-a", "never-sent")
    assert not admit(guard, rec, "agent-a", "t3", correlation_id="other")
    assert not admit(guard, rec, "agent-a", "t3", kind="task")
    assert admit(guard, rec, "agent-z", "t3")
    assert [r[0] for r in rec.refusals] == ["result_unbound"] * 3


def test_a_failing_check_refuses() -> None:
    guard, rec = ResultGuard(), Recorder()
    guard.expect("t4", "agent-a")

    def broken(raw: Any) -> Any:
        raise RuntimeError("bug")

    assert not guard.admit({"task_id": "t4", "status": "SUCCESS"}, b"raw", None, verify=broken, record=rec)
    assert rec.refusals == [("check_error", None, "t4")]
    with pytest.raises(ValueError):
        guard.expect("t5", "")
