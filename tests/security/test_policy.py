"""Unit tests of each role-policy object (security.policy) and the wire contract's ids.

No Celery, no broker: a policy sees only the facts of one verified message."""

from __future__ import annotations

import json
import uuid

import pytest

from security import contract
from security.policy import (
    AllOf,
    ByRole,
    EtaWithin,
    IdBoundToSigner,
    NoBuiltinTasks,
    NoCanvas,
    Refusal,
    Refuse,
    SignerIn,
    TaskMessage,
    TasksAllowed,
    agent_policy,
    baseline_policy,
    coordinator_policy,
)

BUILTINS = ("celery.group", "celery.chain", "celery.chord", "celery.map", "celery.starmap", "celery.chunks",
            "celery.backend_cleanup", "celery.accumulate", "celery.chord_unlock")


def reading(agent: str, seq: int) -> dict:
    return {"agent_id": agent, "sensor": "temp", "seq": seq, "value": 1.0, "unit": "C", "sampled_at": 1.0}


def ingest(signer: str, seq: int, task_id: str | None = None, **kw) -> TaskMessage:
    return TaskMessage(task=contract.INGEST_TASK, task_id=task_id or contract.reading_task_id(signer, seq),
                       signer=signer, kwargs={"reading": reading(signer, seq)}, **kw)


def reason(refusal: Refusal | None) -> str | None:
    return refusal.reason if refusal else None


# -- contract -----------------------------------------------------------------
def test_contract_ids_are_the_agents_historic_derivation():
    ns = uuid.UUID("6f1c1d2e-5b7a-4c5e-9a51-3c1f0e2d7a44")
    assert contract.reading_task_id("a", 7) == str(uuid.uuid5(ns, "a/reading/7"))
    assert contract.command_result_task_id("a", "c-1") == str(uuid.uuid5(ns, "a/command_result/c-1"))
    sent_at = 1733480000.123456
    assert contract.heartbeat_task_id("a", sent_at) == str(uuid.uuid5(ns, f"a/heartbeat/{sent_at!r}"))
    # what the coordinator sees after JSON: the same float, so the same id
    assert contract.heartbeat_task_id("a", json.loads(json.dumps(sent_at))) == contract.heartbeat_task_id("a", sent_at)
    assert contract.reading_task_id("a", 7) != contract.reading_task_id("b", 7)
    assert contract.agent_queue("a") == "agent.a"


def test_agent_modules_use_the_contract():
    from agent import outbox, runtime

    assert outbox.reading_task_id is contract.reading_task_id
    assert outbox.INGEST_TASK == contract.INGEST_TASK
    assert runtime.INGEST_QUEUE == contract.INGEST_QUEUE


# -- single policies -------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTINS)
def test_no_builtin_tasks_refuses_every_celery_builtin(name):
    msg = TaskMessage(task=name, task_id="x", signer="agent-a")
    refusal = NoBuiltinTasks().check(msg)
    assert reason(refusal) == "task_not_allowed" and name in refusal.detail


def test_no_builtin_tasks_lets_other_names_through():
    assert NoBuiltinTasks().check(ingest("agent-a", 1)) is None
    assert NoBuiltinTasks().check(TaskMessage(task="celeryish.task", task_id="x", signer="a")) is None


@pytest.mark.parametrize("field", ["callbacks", "errbacks", "chain", "chord", "link", "link_error", "group"])
def test_no_canvas_refuses_any_non_empty_canvas_field(field):
    sig = {"task": "edge.agent.set_interval", "args": [1], "kwargs": {}, "options": {"queue": "agent.b"}}
    refusal = NoCanvas().check(ingest("agent-a", 1, embed={field: [sig]}))
    assert reason(refusal) == "canvas_refused" and field in refusal.detail


def test_no_canvas_refuses_group_headers_and_accepts_empty_fields():
    assert reason(NoCanvas().check(ingest("agent-a", 1, headers={"group": "g-1"}))) == "canvas_refused"
    empty = {"callbacks": None, "errbacks": [], "chain": None, "chord": None}
    assert NoCanvas().check(ingest("agent-a", 1, embed=empty, headers={"group": None, "group_index": None})) is None


def test_tasks_allowed_by_name_and_prefix():
    policy = TasksAllowed(frozenset({"edge.ingest"}), prefixes=("edge.agent.",), role="x")
    assert policy.check(ingest("agent-a", 1)) is None
    assert policy.check(TaskMessage(task="edge.agent.status", task_id="x", signer="c")) is None
    refusal = policy.check(TaskMessage(task="edge.heartbeat", task_id="x", signer="c"))
    assert reason(refusal) == "task_not_allowed" and "edge.ingest" in refusal.detail


def test_signer_in():
    assert SignerIn(frozenset({"coordinator"})).check(TaskMessage(task="t", task_id="x", signer="coordinator")) is None
    assert reason(SignerIn(frozenset({"coordinator"})).check(ingest("agent-a", 1))) == "signer_not_allowed"


def test_id_bound_to_signer_accepts_the_signers_own_contract_ids():
    policy = IdBoundToSigner()
    assert policy.check(ingest("agent-a", 5)) is None
    result = {"agent_id": "agent-a", "command_task_id": "cmd-9", "command": "edge.agent.status"}
    assert policy.check(TaskMessage(task=contract.COMMAND_RESULT_TASK, signer="agent-a", kwargs={"result": result},
                                    task_id=contract.command_result_task_id("agent-a", "cmd-9"))) is None
    status = {"agent_id": "agent-a", "sent_at": 1733480000.25}
    assert policy.check(TaskMessage(task=contract.HEARTBEAT_TASK, signer="agent-a", args=(status,),
                                    task_id=contract.heartbeat_task_id("agent-a", 1733480000.25))) is None


def test_id_bound_to_signer_refuses_another_agents_id_and_random_ids():
    policy = IdBoundToSigner()
    squatted = ingest("agent-a", 5, task_id=contract.reading_task_id("agent-b", 5))  # B's next id, signed by A
    refusal = policy.check(squatted)
    assert reason(refusal) == "id_not_bound" and "agent-a" in refusal.detail
    assert reason(policy.check(ingest("agent-a", 5, task_id=str(uuid.uuid4())))) == "id_not_bound"
    # the id is derived from the signer, never from the payload's claimed agent_id
    claims_b = TaskMessage(task=contract.INGEST_TASK, task_id=contract.reading_task_id("agent-b", 5),
                           signer="agent-a", kwargs={"reading": reading("agent-b", 5)})
    assert reason(policy.check(claims_b)) == "id_not_bound"


@pytest.mark.parametrize("payload", [None, {}, {"seq": "5"}, {"seq": True}, {"seq": 5.0}])
def test_id_bound_to_signer_refuses_payloads_without_a_derivable_id(payload):
    msg = TaskMessage(task=contract.INGEST_TASK, task_id=contract.reading_task_id("agent-a", 5), signer="agent-a",
                      kwargs={"reading": payload})
    assert reason(IdBoundToSigner().check(msg)) == "id_not_bound"


def test_id_bound_to_signer_refuses_tasks_without_a_derivation():
    assert reason(IdBoundToSigner().check(TaskMessage(task="edge.other", task_id="x", signer="a"))) == "id_not_bound"


def test_eta_within():
    policy = EtaWithin(60.0)
    assert policy.check(ingest("agent-a", 1)) is None  # not delayed
    assert policy.check(ingest("agent-a", 1, sent_at=1000.0, eta=1060.0)) is None
    refusal = policy.check(ingest("agent-a", 1, sent_at=1000.0, eta=1061.0))
    assert reason(refusal) == "eta_too_far" and "60" in refusal.detail


def test_by_role_dispatches_and_keeps_reserved_names_out():
    policy = ByRole(coordinators=frozenset({"coordinator"}), coordinator=Refuse("task_not_allowed", "no"),
                    agent=TasksAllowed(frozenset({"edge.ingest"})))
    assert policy.check(ingest("agent-a", 1)) is None
    assert reason(policy.check(TaskMessage(task="edge.ingest", task_id="x", signer="coordinator"))) == "task_not_allowed"
    assert reason(policy.check(TaskMessage(task="edge.ingest", task_id="x", signer="broker"))) == "signer_not_allowed"


def test_all_of_returns_the_first_refusal_in_order():
    msg = TaskMessage(task="celery.group", task_id="x", signer="agent-a", embed={"callbacks": [{}]})
    assert reason(AllOf(NoBuiltinTasks(), NoCanvas()).check(msg)) == "task_not_allowed"
    assert reason(AllOf(NoCanvas(), NoBuiltinTasks()).check(msg)) == "canvas_refused"
    assert AllOf().check(msg) is None


# -- the fleet's two role policies ---------------------------------------------
def test_coordinator_policy():
    policy = coordinator_policy("coordinator")
    assert policy.check(ingest("agent-a", 1)) is None
    assert reason(policy.check(TaskMessage(task="edge.agent.status", task_id="x", signer="agent-a"))) == "task_not_allowed"
    for name in BUILTINS:
        assert reason(policy.check(TaskMessage(task=name, task_id="x", signer="agent-a"))) == "task_not_allowed"
    assert reason(policy.check(ingest("agent-a", 1, embed={"chain": [{"task": "x"}]}))) == "canvas_refused"
    assert reason(policy.check(ingest("agent-a", 1, task_id=contract.reading_task_id("agent-b", 1)))) == "id_not_bound"
    # an agent may not park a task in the coordinator's timer for longer than 300 s
    assert reason(policy.check(ingest("agent-a", 1, sent_at=1000.0, eta=1301.0))) == "eta_too_far"
    assert policy.check(ingest("agent-a", 1, sent_at=1000.0, eta=1300.0)) is None
    # the coordinator identity itself causes nothing on its ingest worker
    own = TaskMessage(task=contract.INGEST_TASK, task_id=contract.reading_task_id("coordinator", 1),
                      signer="coordinator", kwargs={"reading": reading("coordinator", 1)})
    assert reason(policy.check(own)) == "task_not_allowed"
    # a custom coordinator identity is the coordinator, "coordinator" then is a reserved name
    custom = coordinator_policy("hq")
    assert reason(custom.check(TaskMessage(task="edge.ingest", task_id="x", signer="hq"))) == "task_not_allowed"
    assert reason(custom.check(TaskMessage(task="edge.ingest", task_id="x", signer="coordinator"))) == "signer_not_allowed"


def test_agent_policy():
    policy = agent_policy(["coordinator"])
    assert policy.check(TaskMessage(task="edge.agent.status", task_id="x", signer="coordinator")) is None
    assert reason(policy.check(TaskMessage(task="edge.agent.status", task_id="x", signer="agent-b"))) == "signer_not_allowed"
    assert reason(policy.check(TaskMessage(task="celery.chord", task_id="x", signer="coordinator"))) == "task_not_allowed"
    assert reason(policy.check(TaskMessage(task="edge.ingest", task_id="x", signer="coordinator"))) == "task_not_allowed"
    assert reason(policy.check(TaskMessage(task="edge.agent.status", task_id="x", signer="coordinator",
                                           embed={"errbacks": [{"task": "x"}]}))) == "canvas_refused"
    with pytest.raises(ValueError, match="command_signers"):
        agent_policy([])


def test_baseline_policy_refuses_builtins_and_canvas_only():
    policy = baseline_policy()
    assert policy.check(TaskMessage(task="t.record", task_id="x", signer="agent-a")) is None
    assert reason(policy.check(TaskMessage(task="celery.map", task_id="x", signer="agent-a"))) == "task_not_allowed"
    assert reason(policy.check(TaskMessage(task="t.record", task_id="x", signer="a", embed={"link": [{}]}))) == "canvas_refused"


def test_policies_are_immutable():
    policy = coordinator_policy()
    with pytest.raises(AttributeError):
        policy.policies = ()  # type: ignore[misc]


def test_coordinator_policy_peers_are_coordinators_not_agents():
    """Several coordinators share the ingest queue: a peer's certificate causes nothing there,
    even a well-formed reading under its own contract id (it is not an agent)."""
    policy = coordinator_policy("coordinator", peers=["coordinator-b"])
    peer = TaskMessage(task=contract.INGEST_TASK, task_id=contract.reading_task_id("coordinator-b", 1),
                       signer="coordinator-b", kwargs={"reading": reading("coordinator-b", 1)})
    assert reason(policy.check(peer)) == "task_not_allowed"
    assert coordinator_policy("coordinator").check(peer) is None  # without `peers` it would pass as an agent
    assert policy.check(ingest("agent-a", 1)) is None
