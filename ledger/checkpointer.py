"""Signed checkpoints of the execution log, on an interval and after N records.

Why both triggers: the interval bounds how long a record waits before a signed (and
then anchored) tree head covers it; the record count bounds how much a single
checkpoint covers under load. Checkpoints are stored in the journal's
`tlog_checkpoint` table and never rewritten: after a lost chain the writer re-anchors
exactly these, so the coordinator cannot quietly publish a different history.

Usage: `Checkpointer(journal, signer).attach()` (every N records, signed inside the
appending transaction: a busy ingest can never starve it) plus `.run(stop_event)` in
its own thread (the interval), or `checkpoint()` to sign the current tree now.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ledger.journal import Journal
from ledger.tlog.checkpoint import Checkpoint, sign_checkpoint
from ledger.tlog.note import Signer

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0
DEFAULT_EVERY = 256
ERROR_PAUSE = 1.0  # seconds before retrying after a failed checkpoint


class Checkpointer:
    """Signs the journal's tree head under the log key (whose name is the origin)."""

    def __init__(self, journal: Journal, signer: Signer, *, interval: float = DEFAULT_INTERVAL,
                 every: int = DEFAULT_EVERY) -> None:
        self.journal = journal
        self.signer = signer
        self.origin = signer.name
        self.interval = interval
        self.every = max(1, every)
        self.signed = 0
        #: called from the `run` thread once a newer checkpoint is committed, whoever signed it
        #: (the interval here, or the every-N hook inside an ingest transaction): the chain
        #: writer's wake-up, so a record waits for one timer, not for two in a row
        self.on_new: Callable[[], None] | None = None

    def attach(self) -> Checkpointer:
        """Sign a checkpoint inside `journal.append` each time the tree reaches a multiple of `every`."""
        self.journal.sign_checkpoints_every(self.every, self._sign)
        return self

    def _sign(self, size: int, root: bytes) -> str:
        self.signed += 1
        return sign_checkpoint(Checkpoint(self.origin, size, root), self.signer)

    def checkpoint(self) -> dict[str, int] | None:
        """Sign and store a checkpoint of the current tree if it grew; returns {size} or None."""
        log_view = self.journal.merkle()
        size = log_view.size
        latest = self.journal.latest_checkpoint()
        if size == 0 or (latest is not None and latest["size"] >= size):
            return None
        cp = Checkpoint(self.origin, size, log_view.root(size))
        if self.journal.add_checkpoint(size, cp.root_hash, sign_checkpoint(cp, self.signer)):
            self.signed += 1
        return {"size": size}

    def due(self, last_at: float, latest_size: int | None = None) -> bool:
        """Whether to sign now; `latest_size`: the newest checkpoint's size if already read."""
        grown = self.journal.tree_size() - (self._latest_size() if latest_size is None else latest_size)
        return grown > 0 and (grown >= self.every or time.monotonic() - last_at >= self.interval)

    def _latest_size(self) -> int:
        latest = self.journal.latest_checkpoint()
        return latest["size"] if latest else 0

    def run(self, stop: threading.Event, poll: float = 0.05) -> None:
        """Until `stop`: checkpoint when due; survive errors (logged once per episode, retried).

        Why a pause after an error: a full disk or a stuck lock does not clear within one
        poll; retrying every 50 ms only burned CPU and wrote 20 log lines a second."""
        last_at = time.monotonic()
        failing = False
        announced: int | None = None  # newest checkpoint size `on_new` was told of
        while not stop.is_set():
            pause = min(poll, self.interval)
            try:
                latest = self._latest_size()
                if self.due(last_at, latest):
                    if self.checkpoint() is not None:
                        latest = self._latest_size()
                    last_at = time.monotonic()
                if announced is not None and latest > announced and self.on_new is not None:
                    self.on_new()
                announced = latest
                if failing:
                    failing = False
                    log.warning("checkpointer: the journal takes checkpoints again")
            except Exception as exc:  # noqa: BLE001 - a locked or full journal etc.: retry after a pause
                if not failing:
                    log.warning("checkpointer: %s: %s (retrying every %.0fs until it works)",
                                type(exc).__name__, exc, ERROR_PAUSE)
                failing = True
                pause = ERROR_PAUSE
            stop.wait(pause)
