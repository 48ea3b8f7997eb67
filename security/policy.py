"""Who may cause which task: the fleet's role policy, in one place.

Why: a valid certificate proves WHO signed a message, not that its signer may make
this worker do THIS. Without a role policy an agent could call Celery's built-in
tasks (`celery.group`, `celery.chord`, ...) or attach callbacks to a genuine
`edge.ingest`, and the coordinator would publish the follow-up tasks signed as
itself to another agent's queue (confused deputy). So every admitted task message
is also judged here, before Celery builds a Request and before anything can publish.

Style: small immutable policy objects, each answering `check(message)` with a
`Refusal` (reason + detail) or None; `AllOf` composes them. No module-level mutable
state. The reasons are the quarantine/metric labels of docs/INTERFACES.md.

Why `_Frozen` and not `@dataclass(frozen=True)`: this module is on the device agent's
start path, and a frozen dataclass generates and exec()s its methods when the class is
created (about 1 ms per class, 11 ms for this module, on every start). `_Frozen` gives
the same value semantics (immutable, equal and hashed by fields, a readable repr) with
methods written once.

Roles: the coordinator identity (certificate CN, default "coordinator") and agents
(every other fleet certificate; CN = agent id). "coordinator" and "broker" are
reserved names, never agents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from . import contract

# Protocol-2 embed fields that make the worker publish follow-up tasks, plus the
# protocol-1 / signature names an attacker may try instead.
CANVAS_EMBED_FIELDS = ("callbacks", "errbacks", "chain", "chord", "link", "link_error", "group")
CANVAS_HEADER_FIELDS = ("group", "group_index", "chord")
BUILTIN_PREFIX = "celery."


class _Frozen:
    """Immutable value object over `__slots__`: fields are set once, by `_set` in __init__."""

    __slots__: tuple[str, ...] = ()

    def _set(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot assign to {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name!r}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Refusal(_Frozen):
    """Why a message may not run: `reason` is the metric/quarantine label."""

    __slots__ = ("reason", "detail")
    reason: str
    detail: str

    def __init__(self, reason: str, detail: str) -> None:
        self._set(reason=reason, detail=detail)


class TaskMessage(_Frozen):
    """The facts a policy decides on: one task message whose signature already passed.

    `signer` is the certificate CN of the verified signer (never a header value);
    args/kwargs/embed are the signed body; sent_at is the signed send time and eta the
    signed eta (unix seconds; eta None when not delayed).
    """

    __slots__ = ("task", "task_id", "signer", "args", "kwargs", "embed", "headers", "sent_at", "eta")
    task: str
    task_id: str
    signer: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    embed: Mapping[str, Any]
    headers: Mapping[str, Any]
    sent_at: float | None
    eta: float | None

    def __init__(self, task: str, task_id: str, signer: str, args: tuple[Any, ...] = (),
                 kwargs: Mapping[str, Any] | None = None, embed: Mapping[str, Any] | None = None,
                 headers: Mapping[str, Any] | None = None, sent_at: float | None = None,
                 eta: float | None = None) -> None:
        self._set(task=task, task_id=task_id, signer=signer, args=args,
                  kwargs={} if kwargs is None else kwargs, embed={} if embed is None else embed,
                  headers={} if headers is None else headers, sent_at=sent_at, eta=eta)

    def argument(self, name: str, position: int = 0) -> Any:
        """A task argument given by keyword or at `position` (None when absent)."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[position] if len(self.args) > position else None


class Policy(Protocol):
    def check(self, message: TaskMessage) -> Refusal | None:
        """A refusal, or None when this policy lets the message through."""


class AllOf(_Frozen):
    """Every policy must pass; the first refusal (in the given order) wins."""

    __slots__ = ("policies",)
    policies: tuple[Policy, ...]

    def __init__(self, *policies: Policy) -> None:
        self._set(policies=tuple(policies))

    def check(self, message: TaskMessage) -> Refusal | None:
        for policy in self.policies:
            refusal = policy.check(message)
            if refusal is not None:
                return refusal
        return None


class Refuse(_Frozen):
    """Refuses everything: the policy of a role that may cause nothing here."""

    __slots__ = ("reason", "detail")
    reason: str
    detail: str

    def __init__(self, reason: str, detail: str) -> None:
        self._set(reason=reason, detail=detail)

    def check(self, message: TaskMessage) -> Refusal | None:
        return Refusal(self.reason, f"{self.detail} (task {message.task!r} from {message.signer!r})")


class NoBuiltinTasks(_Frozen):
    """Celery's own tasks (`celery.group`, `celery.chord_unlock`, `celery.backend_cleanup`,
    ...) publish or delete things as the worker: no remote signer may call them."""

    __slots__ = ()

    def check(self, message: TaskMessage) -> Refusal | None:
        if message.task.startswith(BUILTIN_PREFIX):
            return Refusal("task_not_allowed", f"Celery built-in {message.task!r} may not be called remotely")
        return None


class NoCanvas(_Frozen):
    """No callbacks, errbacks, chain, chord or group: the worker would publish the next
    step signed as itself, for whoever wrote it into the message."""

    __slots__ = ()

    def check(self, message: TaskMessage) -> Refusal | None:
        for name in CANVAS_EMBED_FIELDS:
            if message.embed.get(name):
                return Refusal("canvas_refused", f"message carries {name!r}: callbacks and canvas are not accepted")
        for name in CANVAS_HEADER_FIELDS:
            if message.headers.get(name) not in (None, "", [], {}):
                return Refusal("canvas_refused", f"message header {name!r} is set: groups and chords are not accepted")
        return None


class TasksAllowed(_Frozen):
    """The task name must be one of `names` or start with one of `prefixes`."""

    __slots__ = ("names", "prefixes", "role")
    names: frozenset[str]
    prefixes: tuple[str, ...]
    role: str

    def __init__(self, names: frozenset[str] = frozenset(), prefixes: tuple[str, ...] = (),
                 role: str = "this signer") -> None:
        self._set(names=names, prefixes=prefixes, role=role)

    def check(self, message: TaskMessage) -> Refusal | None:
        if message.task in self.names or any(message.task.startswith(p) for p in self.prefixes):
            return None
        allowed = sorted(self.names) + [f"{p}*" for p in self.prefixes]
        return Refusal("task_not_allowed", f"{self.role} may not cause {message.task!r}; allowed: {', '.join(allowed)}")


class SignerIn(_Frozen):
    """Only the listed certificate CNs may send tasks here."""

    __slots__ = ("names",)
    names: frozenset[str]

    def __init__(self, names: frozenset[str]) -> None:
        self._set(names=names)

    def check(self, message: TaskMessage) -> Refusal | None:
        if message.signer in self.names:
            return None
        return Refusal("signer_not_allowed", f"{message.signer!r} may not send tasks here (only {', '.join(sorted(self.names))})")


class EtaWithin(_Frozen):
    """The eta may be at most `seconds` after sending: a task parked in the worker's
    timer waits there unjournaled, holding a prefetch slot, for as long as its sender
    chose (max_delay_seconds bounds every signer; a role may be bound tighter)."""

    __slots__ = ("seconds",)
    seconds: float

    def __init__(self, seconds: float) -> None:
        self._set(seconds=seconds)

    def check(self, message: TaskMessage) -> Refusal | None:
        if message.eta is None or message.sent_at is None or message.eta - message.sent_at <= self.seconds:
            return None
        return Refusal("eta_too_far", f"eta is {message.eta - message.sent_at:.0f}s after sending; "
                                      f"{message.signer!r} may delay {message.task} by at most {self.seconds:g}s")


def _reading_id(signer: str, message: TaskMessage) -> str | None:
    reading = message.argument("reading")
    seq = reading.get("seq") if isinstance(reading, dict) else None
    return contract.reading_task_id(signer, seq) if isinstance(seq, int) and not isinstance(seq, bool) else None


def _command_result_id(signer: str, message: TaskMessage) -> str | None:
    result = message.argument("result")
    command = result.get("command_task_id") if isinstance(result, dict) else None
    return contract.command_result_task_id(signer, command) if isinstance(command, str) and command else None


def _heartbeat_id(signer: str, message: TaskMessage) -> str | None:
    status = message.argument("status")
    sent_at = status.get("sent_at") if isinstance(status, dict) else None
    if isinstance(sent_at, (int, float)) and not isinstance(sent_at, bool):
        return contract.heartbeat_task_id(signer, sent_at)
    return None


def _cosign_id(signer: str, message: TaskMessage) -> str | None:
    cosignature = message.argument("cosignature")
    size = cosignature.get("size") if isinstance(cosignature, dict) else None
    return contract.cosign_task_id(signer, size) if isinstance(size, int) and not isinstance(size, bool) else None


DERIVATIONS: Mapping[str, Callable[[str, TaskMessage], str | None]] = {
    contract.INGEST_TASK: _reading_id,
    contract.COMMAND_RESULT_TASK: _command_result_id,
    contract.HEARTBEAT_TASK: _heartbeat_id,
    contract.WITNESS_COSIGN_TASK: _cosign_id,
}


class IdBoundToSigner(_Frozen):
    """An agent's task id must be the contract's id derived from the SIGNER's CN and the
    payload, so agent A cannot occupy agent B's next ids (task-id squatting)."""

    __slots__ = ()

    def check(self, message: TaskMessage) -> Refusal | None:
        derive = DERIVATIONS.get(message.task)
        if derive is None:
            return Refusal("id_not_bound", f"no task-id derivation for {message.task!r}")
        expected = derive(message.signer, message)
        if expected is None:
            return Refusal("id_not_bound", f"{message.task} payload lacks the field its task id is derived from")
        if message.task_id != expected:
            return Refusal(
                "id_not_bound",
                f"task id {message.task_id!r} is not the id {expected!r} derived for signer {message.signer!r}",
            )
        return None


class ByRole(_Frozen):
    """Dispatch on the signer's role: the coordinator identities, reserved names, agents."""

    __slots__ = ("coordinators", "coordinator", "agent")
    coordinators: frozenset[str]
    coordinator: Policy
    agent: Policy

    def __init__(self, coordinators: frozenset[str], coordinator: Policy, agent: Policy) -> None:
        self._set(coordinators=coordinators, coordinator=coordinator, agent=agent)

    def check(self, message: TaskMessage) -> Refusal | None:
        if message.signer in self.coordinators:
            return self.coordinator.check(message)
        if message.signer in contract.RESERVED_IDENTITIES:
            return Refusal("signer_not_allowed", f"{message.signer!r} is a reserved identity, not an agent")
        return self.agent.check(message)


def baseline_policy() -> Policy:
    """What every signing worker refuses, whatever its role: built-ins and canvas."""
    return AllOf(NoBuiltinTasks(), NoCanvas())


AGENT_MAX_DELAY = 300.0  # seconds an agent may delay a task at the coordinator (it needs none)


def coordinator_policy(identity: str = contract.DEFAULT_COORDINATOR_IDENTITY,
                       agent_max_delay: float = AGENT_MAX_DELAY, peers: Iterable[str] = ()) -> Policy:
    """The ingest worker: an agent may cause only edge.ingest / edge.command_result /
    edge.heartbeat / edge.witness.cosign, under its own contract ids, delayed by at most `agent_max_delay`
    (agents send no delayed tasks; this only bounds how long one can sit in the
    coordinator's timer); the coordinator identity, and the `peers` sharing its ingest
    queue (other coordinators, never agents), cause nothing."""
    return AllOf(
        NoBuiltinTasks(),
        NoCanvas(),
        ByRole(
            coordinators=frozenset({identity, *peers}),
            coordinator=Refuse("task_not_allowed", "the coordinator identity causes no tasks on its ingest worker"),
            agent=AllOf(TasksAllowed(contract.AGENT_TO_COORDINATOR_TASKS, role="an agent"), IdBoundToSigner(),
                        EtaWithin(agent_max_delay)),
        ),
    )


def agent_policy(command_signers: Iterable[str] = (contract.DEFAULT_COORDINATOR_IDENTITY,)) -> Policy:
    """An agent's worker: only the coordinator identity may command it, and only with
    the agent's own command tasks (edge.agent.*)."""
    signers = frozenset(command_signers)
    if not signers:
        raise ValueError("agent_policy needs the coordinator identity (command_signers must not be empty)")
    return AllOf(
        NoBuiltinTasks(),
        NoCanvas(),
        SignerIn(signers),
        TasksAllowed(prefixes=(contract.AGENT_COMMAND_PREFIX,), role="the coordinator"),
    )
