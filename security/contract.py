"""The wire contract between agents and the coordinator: names and task-id derivations.

Why one module: the ids an agent puts on its tasks are checked by the coordinator's
policy (`id_not_bound`), so both sides must derive them from the same code. `agent`
and `coordinator` never import each other; both import this. No Celery, no I/O:
it is on the device agent's import path.

A task id is `uuid5(TASK_ID_NAMESPACE, "<agent_id>/<kind>/<key>")`. The agent id in it
is the SIGNER's certificate CN, so agent A cannot produce one of agent B's ids under
its own signature (task-id squatting), and a re-sent message carries the same id, so
the receiver deduplicates it.
"""

from __future__ import annotations

import uuid

TASK_ID_NAMESPACE = uuid.UUID("6f1c1d2e-5b7a-4c5e-9a51-3c1f0e2d7a44")

# Tasks an agent causes on the coordinator (queue INGEST_QUEUE).
INGEST_TASK = "edge.ingest"
COMMAND_RESULT_TASK = "edge.command_result"
HEARTBEAT_TASK = "edge.heartbeat"
AGENT_TO_COORDINATOR_TASKS = frozenset({INGEST_TASK, COMMAND_RESULT_TASK, HEARTBEAT_TASK})

# Commands the coordinator sends to an agent (queue agent_queue(agent_id)).
AGENT_COMMAND_PREFIX = "edge.agent."
SAMPLE_NOW_TASK = "edge.agent.sample_now"
SET_INTERVAL_TASK = "edge.agent.set_interval"
STATUS_TASK = "edge.agent.status"
AGENT_COMMANDS = (SAMPLE_NOW_TASK, SET_INTERVAL_TASK, STATUS_TASK)
# Pushed by the coordinator daemon, never answered with an edge.command_result:
# "everything from you up to seq N (and these seqs above it) is journaled" (coordinator/receipts.py).
RECEIPT_TASK = "edge.agent.receipt"
UPDATE_CRL_TASK = "edge.agent.update_crl"
AGENT_PUSHES = (RECEIPT_TASK, UPDATE_CRL_TASK)

# Agent -> coordinator tasks that are journaled under their unique contract id: a re-send
# (a NEW signed envelope under the same id, after no receipt came) is a duplicate the
# journal dedupes, not a replay (security.replay keeps refusing the same envelope twice).
RESENDABLE_TASKS = AGENT_TO_COORDINATOR_TASKS

INGEST_QUEUE = "edge.ingest"
AGENT_QUEUE_PREFIX = "agent."
REPLY_EXCHANGE = "c.rep"  # rpc:// results travel on this direct exchange (broker ACL)

DEFAULT_COORDINATOR_IDENTITY = "coordinator"
RESERVED_IDENTITIES = frozenset({"coordinator", "broker"})


def is_fleet_task(name: str) -> bool:
    """A task name of this contract (either direction): a worker that does not run it
    was sent a task of another role (`task_not_allowed`, not `unknown_task`)."""
    return name in AGENT_TO_COORDINATOR_TASKS or name in AGENT_COMMANDS or name in AGENT_PUSHES


def agent_queue(agent_id: str) -> str:
    """The queue only `agent_id` consumes its commands from."""
    return f"{AGENT_QUEUE_PREFIX}{agent_id}"


def _derive(agent_id: str, kind: str, key: str) -> str:
    return str(uuid.uuid5(TASK_ID_NAMESPACE, f"{agent_id}/{kind}/{key}"))


def reading_task_id(agent_id: str, seq: int) -> str:
    """Deterministic: a re-sent reading carries the same id, so the receiver dedupes."""
    return _derive(agent_id, "reading", str(int(seq)))


def command_result_task_id(agent_id: str, command_task_id: str) -> str:
    return _derive(agent_id, "command_result", str(command_task_id))


def heartbeat_task_id(agent_id: str, sent_at: float) -> str:
    """Keyed by the heartbeat's own `sent_at` (repr of the float, as JSON round-trips it)."""
    return _derive(agent_id, "heartbeat", repr(float(sent_at)))
