"""Checkpoint pins for auditors, like ssh's known_hosts: first use pins, later use must extend.

Why: a coordinator holds its own log key, so it can sign any history. What it cannot do
is show two auditors (or one auditor twice) histories where the later one does not
extend the earlier: each audit proves the newest checkpoint consistent with the pinned
one before moving the pin forward. The file is JSON, one entry per log origin:
    {"<origin>": {"vkey": "<log verifier key>", "size": N, "root": "<base64>", "pinned_at": <unix s>}}

Default location: $EDGE_AUDIT_PINS, else $XDG_STATE_HOME/edgeledger/audit-pins.json
(XDG_STATE_HOME defaults to ~/.local/state).
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ledger.tlog.errors import ProofError
from ledger.tlog.merkle import verify_consistency

ConsistencyFn = Callable[[int, int], Sequence[bytes]]


class PinError(RuntimeError):
    """The pin file cannot be read or written."""


def default_pins_path() -> Path:
    if os.environ.get("EDGE_AUDIT_PINS"):
        return Path(os.environ["EDGE_AUDIT_PINS"])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "edgeledger" / "audit-pins.json"


@dataclass(frozen=True)
class Pin:
    vkey: str
    size: int
    root: bytes


class PinStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            raw = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError) as exc:
            raise PinError(f"pin file {self.path} is unreadable ({exc}): fix or move it away") from None
        self._pins = {o: Pin(p["vkey"], int(p["size"]), base64.b64decode(p["root"])) for o, p in raw.items()}

    def get(self, origin: str) -> Pin | None:
        return self._pins.get(origin)

    def check(self, origin: str, vkey: str, size: int, root: bytes, consistency: ConsistencyFn) -> list[tuple[str, str]]:
        """Findings (kind, detail) for the log's newest checkpoint against the pin; [] when fine or unpinned."""
        pin = self._pins.get(origin)
        if pin is None:
            return []
        if pin.vkey != vkey:
            return [("log_key_changed", f"the log {origin} was pinned with key {pin.vkey}, now signed by {vkey}")]
        if size < pin.size:
            return [("pin_inconsistent", f"newest checkpoint has size {size}, smaller than the pinned {pin.size}: "
                                         "the log was truncated or rewritten")]
        try:
            proof = [] if size == pin.size else consistency(pin.size, size)
            verify_consistency(pin.size, size, pin.root, root, proof)
        except ProofError as exc:
            return [("pin_inconsistent", f"checkpoint of size {size} does not extend the pinned size {pin.size}: {exc}")]
        return []

    def update(self, origin: str, vkey: str, size: int, root: bytes) -> None:
        pin = self._pins.get(origin)
        if pin is not None and pin.size > size:
            return
        self._pins[origin] = Pin(vkey, size, root)
        data = {o: {"vkey": p.vkey, "size": p.size, "root": base64.b64encode(p.root).decode(), "pinned_at": time.time()}
                for o, p in self._pins.items()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            tmp.replace(self.path)
        except OSError as exc:
            raise PinError(f"cannot write pin file {self.path}: {exc.strerror}") from None
