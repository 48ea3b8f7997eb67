"""End-to-end receipts: tell each agent, signed, which of its readings are journaled.

Why: the broker's PUBACK only says Mosquitto has a message (it persists about once a
second and a journal may refuse a write); an agent may delete a reading only once the
coordinator durably journaled it. The ingest worker reports every committed reading
(new or a re-sent duplicate) to a `ReceiptBook`; the `ReceiptSender` thread sends one
`edge.agent.receipt` per agent with news, at most every `interval` seconds (sooner
after `batch` new readings), so a device sampling once a second gets one message per
interval, not one per reading, and an idle one gets none.

Receipt payload (version 1; agents ignore fields they do not know):
    {"v": 1, "agent_id": str, "upto": N, "held": [[lo, hi], ...], "issued_at": t,
     "checkpoint": null | {"note": signed checkpoint note, "log_key": the log's vkey,
                           "consistency": null | {"from": M, "proof": [base64 hash, ...]},
                           "proofs": [{"seq", "index", "salt", "path": [base64 hash, ...],
                                       + the record fields the agent cannot know}, ...]}}
`upto`: every seq 1..N is journaled; `held`: journaled ranges above N (readings the
agent dropped under its outbox bound leave a permanent gap, so `upto` alone would
stall behind it). At most MAX_RANGES ranges; readings beyond are confirmed later.

`checkpoint` (agents as witnesses, agent/witness.py): the newest signed checkpoint,
a consistency proof from the size the agent last cosigned (the journal's
`tlog_cosignature`; none for its first checkpoint, accepted on trust-on-first-use),
and inclusion proofs of up to MAX_PROOFS of the readings noted since the last receipt
that the checkpoint covers. The agent deletes a reading only once its proof verified;
readings confirmed without a proof (not yet covered, or beyond MAX_PROOFS) get theirs
in a later receipt (kept in `_unproven`), or, after a coordinator restart, when the
agent re-sends them (`resend_after`) and the duplicate is noted again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ledger.journal import JournalReader, open_reader
from ledger.sqlite_files import read_only
from ledger.tlog.note import b64encode
from security.contract import RECEIPT_MAX_PROOFS, RECEIPT_TASK, agent_queue

from .ingest import reading_seq_ranges

log = logging.getLogger("edgeledger.coordinator.receipts")

RECEIPT_VERSION = 1
MAX_RANGES = 256
TRANSIENT = 1  # kombu delivery_mode: kombu_mqtt does not await it alone (confirm_publishes does)
MAX_PROOFS = RECEIPT_MAX_PROOFS  # inclusion proofs per receipt: ~1 KB each (<= 20 hashes at 10^6 records)


def add_seq(ranges: list[list[int]], seq: int) -> None:
    """Insert `seq` into sorted, disjoint, non-adjacent inclusive ranges (in place)."""
    lo, hi = 0, len(ranges)
    while lo < hi:  # first range whose end >= seq - 1
        mid = (lo + hi) // 2
        if ranges[mid][1] < seq - 1:
            lo = mid + 1
        else:
            hi = mid
    i = lo
    if i < len(ranges) and ranges[i][0] <= seq <= ranges[i][1]:
        return
    if i < len(ranges) and ranges[i][1] == seq - 1:
        ranges[i][1] = seq
        if i + 1 < len(ranges) and ranges[i + 1][0] == seq + 1:
            ranges[i][1] = ranges.pop(i + 1)[1]
    elif i < len(ranges) and ranges[i][0] == seq + 1:
        ranges[i][0] = seq
    else:
        ranges.insert(i, [seq, seq])


def journaled_ranges(journal_path: Path, agent_id: str) -> list[list[int]]:
    """The agent's stored seqs as ranges, straight from the journal (gaps and islands)."""
    if not Path(journal_path).exists():
        return []
    with read_only(journal_path, timeout=30) as conn:
        return reading_seq_ranges(conn, agent_id)


class WitnessProver:
    """The witness parts of one round of receipts, read from one journal connection.

    Why a round object: the log key, the newest checkpoint and the tree's frontier are the
    same for every agent in a round; read per agent (a fleet's round has hundreds), they
    cost more than the proofs themselves.
    """

    def __init__(self, journal: JournalReader) -> None:
        self.journal = journal
        self.key = journal.config_value("log_vkey")
        self.top = journal.checkpoint_note()
        self.tree = journal.merkle() if self.key is not None and self.top is not None else None

    @property
    def size(self) -> int:
        """Size of the newest signed checkpoint (0 before the first)."""
        return 0 if self.top is None else self.top[0]

    def part(self, agent_id: str, seqs: list[int]) -> tuple[dict[str, Any] | None, list[int]]:
        """The receipt's `checkpoint` object for `agent_id` and the seqs it proves (None when
        the journal has no log key or no checkpoint yet)."""
        if self.tree is None or self.top is None:
            return None, []
        size, note = self.top
        last = self.journal.largest_cosigned_size(agent_id, size)
        consistency = None
        if last is not None:
            proof = self.tree.consistency_proof(last, size) if last < size else []
            consistency = {"from": last, "proof": [b64encode(h) for h in proof]}
        leaves: dict[int, dict[str, Any]] = {}
        provable: list[int] = []
        for start in range(0, len(seqs), MAX_PROOFS):  # a backlog may hold thousands: read only what is used
            chunk = seqs[start : start + MAX_PROOFS]
            leaves.update(self.journal.reading_leaf_inputs(agent_id, chunk))
            # Seqs not yet under the newest checkpoint (or erased) are left for a later receipt.
            provable += [seq for seq in chunk if seq in leaves and leaves[seq]["index"] < size]
            if len(provable) >= MAX_PROOFS:
                break
        provable = provable[:MAX_PROOFS]
        paths = self.tree.inclusion_proofs([leaves[seq]["index"] for seq in provable], size)
        proofs = [{"seq": seq, **leaves[seq], "salt": b64encode(leaves[seq]["salt"]),
                   "path": [b64encode(h) for h in path]} for seq, path in zip(provable, paths, strict=True)]
        return {"note": note, "log_key": self.key, "consistency": consistency, "proofs": proofs}, provable


def make_receipt(agent_id: str, ranges: list[list[int]], now: float | None = None) -> dict[str, Any]:
    upto, rest = 0, ranges
    if ranges and ranges[0][0] <= 1:
        upto, rest = ranges[0][1], ranges[1:]
    return {"v": RECEIPT_VERSION, "agent_id": agent_id, "upto": upto, "held": [list(r) for r in rest[:MAX_RANGES]],
            "issued_at": time.time() if now is None else now, "checkpoint": None}


class ReceiptBook:
    """Which seqs each agent has journaled, and which agents have news (thread-safe)."""

    def __init__(self, journal_path: Path, batch: int = 200) -> None:
        self.journal_path = Path(journal_path)
        self.batch = batch
        self._lock = threading.Lock()
        self._ranges: dict[str, list[list[int]]] = {}
        self._news: dict[str, list[int]] = {}  # agent -> seqs noted since its last receipt
        self._unproven: dict[str, set[int]] = {}  # agent -> confirmed seqs no receipt proved yet
        self._proved_at: dict[str, int] = {}  # agent -> checkpoint size of its last receipt
        self._more: set[str] = set()  # agents whose last receipt hit MAX_PROOFS: catch up without waiting
        self.wake = threading.Event()  # set when some agent reached `batch` news

    def note(self, agent_id: str, seq: int) -> None:
        """Called by the ingest worker after the journal transaction committed."""
        with self._lock:
            news = self._news.setdefault(agent_id, [])
            news.append(seq)
            if len(news) >= self.batch:
                self.wake.set()

    def take(self) -> list[dict[str, Any]]:
        """One receipt per agent with news since the last call."""
        with self._lock:
            news, self._news = self._news, {}
            self.wake.clear()
        with ExitStack() as stack:
            prover = self._open_prover(stack)
            top = 0 if prover is None else prover.size
            for agent, waiting in self._unproven.items():  # a newer checkpoint may prove what the last could not
                if waiting and (top > self._proved_at.get(agent, 0) or agent in self._more):
                    news.setdefault(agent, [])
            out = []
            for agent, seqs in news.items():
                ranges = self._ranges.get(agent)
                if ranges is None:  # first news from this agent since start: load what is journaled
                    try:
                        ranges = self._ranges[agent] = journaled_ranges(self.journal_path, agent)
                    except sqlite3.Error as exc:  # journal unreadable right now: keep the news for next round
                        log.warning("cannot read %s for %s's receipt (%s): retrying next round",
                                    self.journal_path, agent, exc)
                        with self._lock:
                            self._news.setdefault(agent, []).extend(seqs)
                        continue
                for seq in seqs:
                    add_seq(ranges, seq)
                receipt = make_receipt(agent, ranges)
                self._add_witness_part(receipt, agent, seqs, prover)
                out.append(receipt)
        return out

    def _open_prover(self, stack: ExitStack) -> WitnessProver | None:
        """This round's prover on a read-only journal connection `stack` closes (None when the
        journal is missing or unreadable: the receipts still confirm, proofs come next round)."""
        if not self.journal_path.exists():
            return None
        try:
            return WitnessProver(stack.enter_context(open_reader(self.journal_path)))
        except sqlite3.Error as exc:
            log.warning("no checkpoint in this round's receipts (%s): proving next round", exc)
            return None

    def _add_witness_part(self, receipt: dict[str, Any], agent: str, seqs: list[int],
                          prover: WitnessProver | None) -> None:
        """Fill `checkpoint`; remember which confirmed seqs still lack a proof."""
        wanted = sorted(self._unproven.pop(agent, set()) | set(seqs))
        part: dict[str, Any] | None = None
        proven: list[int] = []
        if prover is not None:
            try:
                part, proven = prover.part(agent, wanted)
            except sqlite3.Error as exc:  # the receipt still confirms; the proofs come next round
                log.warning("no checkpoint in %s's receipt (%s): proving next round", agent, exc)
        receipt["checkpoint"] = part
        rest = set(wanted) - set(proven)
        if rest:
            self._unproven[agent] = rest
        if len(proven) >= MAX_PROOFS and rest:  # a backlog: the next receipt need not wait a whole interval
            self._more.add(agent)
            self.wake.set()
        else:
            self._more.discard(agent)
        if part is not None:
            self._proved_at[agent] = int(part["note"].split("\n", 2)[1])

    def prime(self) -> int:
        """At start: one receipt for every agent with journaled readings.

        Why (several coordinators): readings this coordinator journaled just before it was
        killed may never have been receipted; the agent would re-send them after
        `resend_after`, and a peer coordinator would store them a second time. A restart
        within `resend_after` confirms them first. Returns how many agents were queued."""
        if not self.journal_path.exists():
            return 0
        try:
            with read_only(self.journal_path, timeout=30) as conn:
                agents = [r[0] for r in conn.execute("SELECT DISTINCT agent_id FROM readings")]
        except sqlite3.Error as exc:
            log.warning("no start-up receipts (%s): agents re-send what they miss", exc)
            return 0
        with self._lock:
            for agent in agents:
                self._news.setdefault(agent, [])
            if agents:
                self.wake.set()
        return len(agents)

    def renotify(self, agent_id: str) -> None:
        """A receipt could not be sent: send the agent one next round."""
        with self._lock:
            self._news.setdefault(agent_id, [])


class ReceiptSender:
    """Thread: every `interval` s (or on a full batch) sends the pending receipts, signed."""

    def __init__(self, book: ReceiptBook, make_app: Callable[[], Any], interval: float = 6.0) -> None:
        self.book = book
        self.make_app = make_app
        self.interval = interval
        self.sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, ready: threading.Event | None = None) -> None:
        self._thread = threading.Thread(target=self._run, args=(ready,), name="receipts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.book.wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self, ready: threading.Event | None) -> None:
        # The signing app opens the worker's replay/quarantine files: let the worker create them first.
        while ready is not None and not ready.wait(1.0):
            if self._stop.is_set():
                return
        app = self.make_app()
        conn = app.connection_for_write()
        try:
            while not self._stop.is_set():
                self.book.wake.wait(self.interval)
                if self._stop.is_set():
                    break
                try:
                    self.send_due(app, conn)
                except Exception:
                    log.exception("sending receipts failed; retrying next round")
        finally:
            conn.release()
            app.close()

    def send_due(self, app: Any, conn: Any) -> None:
        """Send the due receipts on `conn` (one connection this thread holds).

        Why not Celery's producer pool: kombu replaces a pooled connection after ANY error
        in a publish, so each receipt for an agent without a broker session
        (NoSubscribersError) cost a new TLS connection. The transport reconnects a held
        connection by itself when the broker goes away.

        Why transient, confirmed per round: awaiting each receipt's PUBACK capped a fleet
        at one broker round trip per agent (bench/fleet.py, 1,000 agents: ~25 receipts/s
        under load, so agents re-sent what was long stored). The round's receipts are
        pipelined and confirmed together; if the broker did not take them all, every agent
        of the round gets one again next round (a receipt is idempotent).
        """
        from kombu.exceptions import OperationalError

        from kombu_mqtt import MqttConnectionError, PublishRejectedError

        producer = app.amqp.Producer(conn, auto_declare=False)
        sent: list[str] = []
        for receipt in self.book.take():
            agent = receipt["agent_id"]
            try:
                app.send_task(RECEIPT_TASK, kwargs={"receipt": receipt}, queue=agent_queue(agent), retry=False,
                              ignore_result=True, producer=producer, delivery_mode=TRANSIENT)
                sent.append(agent)
            except (OperationalError, OSError) as exc:
                log.warning("receipt for %s not sent (%s): retrying next round", agent, exc)
                self.book.renotify(agent)
            except Exception as exc:  # noqa: BLE001 - one agent's receipt must not stop the others
                log.error("receipt for %s not sent: %s", agent, exc)
                self.book.renotify(agent)
        if not sent:
            return
        try:
            unrouted = conn.transport.confirm_publishes()
        except (MqttConnectionError, PublishRejectedError, OSError) as exc:
            log.warning("%d receipts not confirmed by the broker (%s): sending them again next round", len(sent), exc)
            for agent in sent:
                self.book.renotify(agent)
            return
        if unrouted:
            log.info("%d of %d receipts reached no agent session (those agents re-send, and get one then)",
                     unrouted, len(sent))
        self.sent += len(sent) - unrouted
