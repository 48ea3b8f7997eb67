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

import json
import uuid
from dataclasses import dataclass
from typing import Any

TASK_ID_NAMESPACE = uuid.UUID("6f1c1d2e-5b7a-4c5e-9a51-3c1f0e2d7a44")

# Tasks an agent causes on the coordinator (queue INGEST_QUEUE).
INGEST_TASK = "edge.ingest"
COMMAND_RESULT_TASK = "edge.command_result"
HEARTBEAT_TASK = "edge.heartbeat"
# An agent's witness cosignature of a log checkpoint it verified (agent/witness.py).
WITNESS_COSIGN_TASK = "edge.witness.cosign"
AGENT_TO_COORDINATOR_TASKS = frozenset({INGEST_TASK, COMMAND_RESULT_TASK, HEARTBEAT_TASK, WITNESS_COSIGN_TASK})

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
# At most this many inclusion proofs per receipt, lowest seq first: a receipt with fewer
# proved every confirmed reading its checkpoint covers (agent/witness.py counts on that).
RECEIPT_MAX_PROOFS = 64

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


def witness_key_name(agent_id: str) -> str:
    """The C2SP key name of an agent's witness key: it names the agent, so the coordinator
    and auditors can tell whose cosignature a line is (checked against the signer's CN)."""
    return f"witness/{agent_id}"


def cosign_task_id(agent_id: str, size: int) -> str:
    """One cosignature per agent and checkpoint size: a re-sent one is deduplicated."""
    return _derive(agent_id, "cosign", str(int(size)))


def heartbeat_task_id(agent_id: str, sent_at: float) -> str:
    """Keyed by the heartbeat's own `sent_at` (repr of the float, as JSON round-trips it)."""
    return _derive(agent_id, "heartbeat", repr(float(sent_at)))


# Signatures of the agent commands, checked by the sender BEFORE anything is published
# (`edge-coordinator send`): a wrong argument is a usage error on the operator's terminal,
# not a FAILURE on the device after a round trip. Kept here, next to the names, because
# the coordinator never imports the agent package.
@dataclass(frozen=True)
class Param:
    name: str
    types: tuple[type, ...]  # accepted JSON value types (bool is never a number)
    required: bool = True
    doc: str = ""

    def describe(self) -> str:
        kinds = "|".join("null" if t is type(None) else {int: "int", float: "number", str: "string"}.get(t, t.__name__)
                         for t in self.types if not (t is int and float in self.types))
        return f"{self.name}: {kinds}" + ("" if self.required else " (optional)")


AGENT_COMMAND_PARAMS: dict[str, tuple[Param, ...]] = {
    SAMPLE_NOW_TASK: (Param("sensor", (str, type(None)), required=False,
                            doc="sensor driver name as in the agent's `sensors` (e.g. simulated); default: all"),),
    SET_INTERVAL_TASK: (Param("seconds", (int, float), doc="new sampling interval in seconds"),),
    STATUS_TASK: (),
}


class CommandArgumentError(ValueError):
    """The arguments do not fit the command's signature; the message says how to call it."""


def command_usage(name: str) -> str:
    params = AGENT_COMMAND_PARAMS[name]
    return f"{name.removeprefix(AGENT_COMMAND_PREFIX)}({', '.join(p.describe() for p in params)})"


def check_command_args(name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Raise CommandArgumentError unless `args`/`kwargs` bind to `name`'s signature with the right types."""
    if name not in AGENT_COMMAND_PARAMS:
        raise CommandArgumentError(f"unknown command {name!r}: use one of "
                                   f"{', '.join(n.removeprefix(AGENT_COMMAND_PREFIX) for n in AGENT_COMMAND_PARAMS)}")
    params = AGENT_COMMAND_PARAMS[name]
    usage = command_usage(name)
    if len(args) > len(params):
        raise CommandArgumentError(f"{usage} takes {len(params)} argument(s), {len(args)} given")
    bound: dict[str, Any] = {}
    for param, value in zip(params, args, strict=False):
        bound[param.name] = value
    known = {p.name for p in params}
    for key, value in kwargs.items():
        if key not in known:
            raise CommandArgumentError(f"{usage} has no argument {key!r}")
        if key in bound:
            raise CommandArgumentError(f"{usage}: {key!r} given twice (positional and keyword)")
        bound[key] = value
    for param in params:
        if param.name not in bound:
            if param.required:
                raise CommandArgumentError(f"{usage}: missing argument {param.name!r}")
            continue
        value = bound[param.name]
        if isinstance(value, bool) or not isinstance(value, param.types):
            raise CommandArgumentError(f"{usage}: {param.name}={json.dumps(value, default=str)} is not a "
                                       f"{param.describe().split(': ', 1)[1].replace(' (optional)', '')}")
