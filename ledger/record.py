"""The execution record: what the coordinator commits to for every task it executes.

Why canonical JSON: an auditor must recompute the exact digest from the journal's
fields alone, in any language: sorted keys, no whitespace, UTF-8, floats as Python's
shortest round-trip repr. On chain go only `task_key`, `agent_key` (sha256 of the
UTF-8 ids), `digest()` (sha256 of the canonical JSON), the status code and
finished_at in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, fields
from json.encoder import encode_basestring as _encode_str
from typing import Any

# Status names the coordinator uses -> uint8 on chain. Unknown names map to OTHER.
STATUS_CODES: dict[str, int] = {
    "SUCCESS": 1,
    "FAILURE": 2,
    "REJECTED": 3,
    "REVOKED": 4,
    "RETRY": 5,
}
STATUS_OTHER = 255


def id_key(identifier: str) -> bytes:
    """bytes32 on-chain key of a task id or agent id: sha256 of its UTF-8 bytes."""
    return hashlib.sha256(identifier.encode("utf-8")).digest()


def status_code(status: str) -> int:
    return STATUS_CODES.get(status, STATUS_OTHER)


@dataclass(frozen=True)
class ExecutionRecord:
    """One task execution. Digests are lowercase SHA-256 hex; times are unix seconds."""

    task_id: str
    task_name: str
    agent_id: str
    signer_fingerprint: str | None
    args_digest: str | None
    result_digest: str | None
    status: str
    received_at: float
    started_at: float | None
    finished_at: float | None
    envelope_digest: str | None

    def __post_init__(self) -> None:
        # Times are floats everywhere (SQLite REAL gives them back as floats), so an int
        # passed in must hash the same as it will when recomputed from the journal.
        for name in ("received_at", "started_at", "finished_at"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, float):
                object.__setattr__(self, name, float(value))

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELD_NAMES}  # asdict() is 10x slower

    def canonical_json(self) -> bytes:
        return canonical_json_of(self.as_dict())

    def digest(self) -> bytes:
        """bytes32: sha256 of canonical_json()."""
        return hashlib.sha256(self.canonical_json()).digest()

    @property
    def task_key(self) -> bytes:
        return id_key(self.task_id)

    @property
    def agent_key(self) -> bytes:
        return id_key(self.agent_id)

    @property
    def status_code(self) -> int:
        return status_code(self.status)

    @property
    def finished_at_ms(self) -> int:
        """The on-chain timestamp: finished_at (or received_at when it never ran), in ms."""
        when = self.finished_at if self.finished_at is not None else self.received_at
        return max(0, int(round(when * 1000)))

    @classmethod
    def from_mapping(cls, row: dict[str, Any]) -> ExecutionRecord:
        """Build from a journal row or JSON object; extra keys are ignored."""
        fields: dict[str, Any] = {name: row.get(name) for name in RECORD_FIELDS}
        return cls(**fields)


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ExecutionRecord))
_FIELD_NAMES = RECORD_FIELDS
_SORTED_KEYS = tuple((name, '"' + name + '":') for name in sorted(RECORD_FIELDS))
_TIME_FIELDS = frozenset(("received_at", "started_at", "finished_at"))


def _reference_json(values: dict[str, Any]) -> bytes:
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def canonical_json_of(values: dict[str, Any]) -> bytes:
    """canonical JSON of a record's fields (from a record, a journal row or a bundle).

    Byte for byte what `json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    allow_nan=False)` gives for the record (times as floats), built directly because the
    audit recomputes it for every row: strings through json's own C escaper, floats by
    their shortest repr (as json does). Any other type takes the json.dumps path.
    """
    parts = []
    for name, key in _SORTED_KEYS:
        value = values.get(name)
        if value is None:
            parts.append(key + "null")
        elif type(value) is str:
            parts.append(key + _encode_str(value))
        elif name in _TIME_FIELDS and type(value) in (float, int) and math.isfinite(value):
            parts.append(key + float.__repr__(float(value)))
        else:
            fixed = {n: values.get(n) for n in RECORD_FIELDS}
            for t in _TIME_FIELDS:
                number = fixed[t]
                if isinstance(number, int) and not isinstance(number, bool):
                    fixed[t] = float(number)
            return _reference_json(fixed)
    return ("{" + ",".join(parts) + "}").encode("utf-8")
