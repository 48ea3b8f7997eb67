"""What runs inside the agent's worker process besides Celery: sensors, outbox, forwarder.

Why a separate object: the command tasks, the worker bootstep and `status` all need
the same outbox/sensors/forwarder; keeping them here keeps app.py to Celery wiring.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import tracemalloc
from typing import Any

from security.contract import (
    COMMAND_RESULT_TASK,
    HEARTBEAT_TASK,
    INGEST_QUEUE,
    INGEST_TASK,
    WITNESS_COSIGN_TASK,
    command_result_task_id,
    cosign_task_id,
    heartbeat_task_id,
)

from .config import AgentConfig
from .errors import AgentError
from .forwarder import Backoff, Forwarder
from .memory import trim
from .outbox import Outbox, OutboxItem
from .sensors import load_sensors
from .takeover import TakeoverReporter, takeover_state

log = logging.getLogger("edge.agent")

MIN_INTERVAL = 0.05  # seconds; below this a device does nothing but sample


def rss_bytes() -> int:
    """Resident set size from /proc (no psutil on devices)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def agent_version() -> str:
    try:
        from importlib.metadata import version

        return version("edgeledger")
    except Exception:  # noqa: BLE001 - frozen binaries carry no package metadata
        return "0.1.0"


#: Celery logs each failed (re)connection of the consuming connection here, with the exception.
CONSUMER_LOGGER = "celery.worker.consumer.consumer"


class ConsumerRefusalWatch(logging.Handler):
    """Hands the consumer's connection errors to the runtime, so a revoked device stops
    even while it has nothing to publish (the forwarder only sees its own connection)."""

    def __init__(self, check: Any) -> None:
        super().__init__(level=logging.ERROR)
        self.check = check

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, BaseException):
                try:
                    self.check(arg)
                except Exception:  # noqa: BLE001 - a log handler must never break the worker
                    self.handleError(record)
                return


class AgentRuntime:
    """Sensors + outbox + forwarder thread, bound to one Celery app."""

    def __init__(self, app: Any, cfg: AgentConfig) -> None:
        self.app = app
        self.cfg = cfg
        self.sensors = load_sensors(cfg.sensors, cfg.agent_id)
        self._local = threading.local()
        self._conn: Any = None
        self._producer: Any = None
        self.started_at = time.time()
        # flags > env > agent.toml > the interval stored by `set_interval` > default
        self.interval = cfg.interval_after_stored(self.outbox().get_meta("interval") or None)
        self.forwarder: Forwarder | None = None
        self.revoked: dict[str, Any] | None = None  # set when this device learns it is revoked
        self._refusal_logged: str | None = None
        self._next_probe = 0.0
        self._probe_lock = threading.Lock()
        self._revoked_lock = threading.Lock()
        self._watch: ConsumerRefusalWatch | None = None
        self.on_receipt: Any = None  # hook (bench): called with (receipt, rows deleted) after a receipt
        self._certificate_reload = False  # set by SIGHUP (agent.app): take up a renewed certificate
        #: the transport's on_takeover hook (agent.app): another device uses this agent id
        self.takeover = TakeoverReporter(cfg.agent_id, self.outbox)

    def outbox(self) -> Outbox:
        """This thread's outbox connection (sqlite3 connections are per thread)."""
        box = getattr(self._local, "outbox", None)
        if box is None:
            box = self._local.outbox = Outbox(self.cfg.outbox_file, self.cfg.agent_id, self.cfg.outbox_max, self.cfg.resend_after)
        return box

    # -- lifecycle ------------------------------------------------------
    def start(self) -> None:
        self.forwarder = Forwarder(
            outbox_factory=lambda: Outbox(self.cfg.outbox_file, self.cfg.agent_id, self.cfg.outbox_max, self.cfg.resend_after),
            sensors=self.sensors,
            interval=self.interval,
            publish=self.publish,
            reset_connection=self.reset_connection,
            backoff=Backoff(self.cfg.backoff_min, self.cfg.backoff_max),
            flush_batch=self.cfg.flush_batch,
            idle_close_after=self.cfg.broker_heartbeat,
            heartbeat=self.store_heartbeat if self.cfg.heartbeat_interval > 0 else None,
            heartbeat_interval=self.cfg.heartbeat_interval,
            on_idle=trim,  # long idle ahead: hand freed heap pages back (agent.memory)
            await_receipts=True,  # a reading leaves only on the coordinator's signed receipt
        )
        self.forwarder.start()
        self._watch = ConsumerRefusalWatch(self._check_refusal)
        logging.getLogger(CONSUMER_LOGGER).addHandler(self._watch)

    def stop(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            logging.getLogger(CONSUMER_LOGGER).removeHandler(watch)
        if self.forwarder is not None:
            self.forwarder.stop()
            self.forwarder = None
        box, self._local.outbox = getattr(self._local, "outbox", None), None
        if box is not None:  # the worker thread's connection (commands, receipts): closed, so
            box.close()      # the outbox's log is checkpointed and a clean stop can be recorded

    # -- publishing (forwarder thread only) ----------------------------
    def publish(self, item: OutboxItem) -> None:
        """Send one stored message; returns after the broker's PUBACK, raises otherwise.

        A connection that sat idle may have been dropped by the broker (keepalive):
        a failure on a reused connection is retried once on a fresh one.
        """
        if self._certificate_reload:
            self._reload_certificate()
        for attempt in (0, 1):
            fresh = self._producer is None
            try:
                if fresh:
                    conn = self.app.connection_for_write()
                    conn.ensure_connection(max_retries=1)
                    self._conn = conn
                    self._producer = conn.Producer()
                self.app.send_task(
                    item.task_name,
                    kwargs=item.kwargs,
                    task_id=item.task_id,
                    queue=INGEST_QUEUE,
                    producer=self._producer,
                    retry=False,
                    ignore_result=True,
                    add_to_parent=False,
                    declare=[],  # never declare edge.ingest: on MQTT a declared queue is a subscription
                )
                return
            except Exception as exc:
                self.reset_connection()
                self._check_refusal(exc)
                if fresh or attempt:
                    raise

    # -- revocation (see agent.revocation) ------------------------------
    def _check_refusal(self, exc: BaseException) -> None:
        """The broker's final no: certificate revoked -> stop for good; not authorized -> say so."""
        from security.refusal import CERT_REVOKED, broker_refusal, describe

        reason = broker_refusal(exc)
        with self._probe_lock:
            probe_now = time.monotonic() >= self._next_probe
            if probe_now:
                self._next_probe = time.monotonic() + 5.0
        if reason != CERT_REVOKED and self.cfg.broker_url.startswith("mqtts") and probe_now:
            # TLS 1.3 hides the broker's alert behind "connection lost": ask directly
            from security.refusal import probe_certificate

            reason = probe_certificate(self.cfg.broker_url, str(self.cfg.ca_file), str(self.cfg.cert_file),
                                       str(self.cfg.key_file), timeout=2.0) or reason
        if reason == CERT_REVOKED:
            self.on_revoked("broker", "the broker refused the TLS handshake: certificate revoked")
        elif reason is not None and self._refusal_logged != reason:
            self._refusal_logged = reason  # keeps retrying: an ACL mistake must not brick a device
            log.error("%s; still retrying until the broker also refuses the certificate", describe(reason))

    def on_revoked(self, reason: str, detail: str) -> None:
        """Persist the mark, log what to do, and stop the worker (exit EXIT_REVOKED)."""
        from .revocation import FIX, mark_revoked

        with self._revoked_lock:  # the forwarder and the consumer may both notice it
            if self.revoked is not None:
                return
            self.revoked = mark_revoked(self.cfg, reason, detail)
        log.error("this device is revoked (%s): %s. Stopping; unsent readings stay in %s", detail, FIX, self.cfg.outbox_file)
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown; `run` then exits EXIT_REVOKED

    def require_fresh_crl(self) -> None:
        """Fail closed: no coordinator command runs on a CRL past its next-update."""
        from security.crl import load_verified_crl
        from security.pki import PKIError

        if not self.cfg.crl_file.exists():
            return  # enrolled without a CRL: nothing to be stale (the first push installs one)
        try:
            load_verified_crl(self.cfg.crl_file, self.cfg.ca_file)
        except PKIError as exc:
            raise AgentError(f"command refused: {exc}") from None

    def update_crl(self, crl_pem: str) -> dict:
        """Install a CRL pushed by the coordinator (edge.agent.update_crl).

        Needs no fresh CRL itself (it brings one): the fleet CA's signature on the CRL,
        its freshness and no-rollback are checked by security.crl before it is written.
        """
        from security.crl import install_crl, lists_serial
        from security.pki import PKIError

        from .revocation import own_serial

        try:
            crl, replaced = install_crl(crl_pem, self.cfg.ca_file, self.cfg.crl_file)
        except PKIError as exc:
            raise AgentError(f"CRL refused: {exc}") from None
        serial = own_serial(self.cfg)
        if serial is not None and lists_serial(crl, serial):
            self.on_revoked("crl", "the fleet CRL pushed by the coordinator lists this device's certificate")
        next_update = crl.next_update_utc
        return {"installed": replaced, "revoked_serials": len(list(crl)),
                "next_update": next_update.isoformat() if next_update else None}

    def apply_receipt(self, receipt: Any) -> dict:
        """Delete the readings the coordinator's receipt (edge.agent.receipt) says it journaled.

        The signing layer already checked the signer is the coordinator; fail closed on
        anything else odd: a receipt for another agent, or one confirming seqs this agent
        never stored (a confused or forged count must not delete unsent readings)."""
        self.require_fresh_crl()
        if not isinstance(receipt, dict) or receipt.get("agent_id") != self.cfg.agent_id:
            raise AgentError(f"receipt refused: it is for {receipt.get('agent_id') if isinstance(receipt, dict) else receipt!r}, "
                             f"not this agent {self.cfg.agent_id!r}")
        box = self.outbox()
        last = int(box.get_meta("next_seq", "1")) - 1
        upto, held = receipt.get("upto"), receipt.get("held") or []

        def seq_ok(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= last

        if not seq_ok(upto) or not isinstance(held, list) or not all(
                isinstance(r, list) and len(r) == 2 and seq_ok(r[0]) and seq_ok(r[1]) and r[0] <= r[1] for r in held):
            raise AgentError(f"receipt refused: seqs outside 0..{last} (what this agent sent): upto={upto!r} held={held!r}")
        # The crash window between this line and the delete is safe: the rows stay, are
        # re-sent, and the coordinator deduplicates them (tests/coordinator/test_receipts_kill_window.py)
        log.info("receipt accepted: upto %d, %d ranges above: checking proofs, deleting the confirmed readings",
                 upto, len(held))
        ranges = [(lo, hi) for lo, hi in held]
        # witness = false (several coordinators, each its own log): the receipt alone confirms
        verdict = self.witness_check(box, receipt.get("checkpoint"), upto, ranges) if self.cfg.witness else None
        if verdict is None:  # no log witnessed yet: the receipt alone confirms
            deleted = box.confirm(upto, ranges)
        else:  # only readings proven in the accepted checkpoint leave; the rest wait for their proof
            confirmed = box.stored_seqs(upto, ranges)
            proven = sorted(set(confirmed) & verdict.proven)
            deleted = box.confirm_seqs(proven, max([upto, *(hi for _, hi in ranges)]))
            if len(proven) < len(confirmed):
                log.info("receipt: %d confirmed readings wait for an inclusion proof", len(confirmed) - len(proven))
        # (bench/e2e.py reads this line for the sample -> receipt latency)
        log.info("receipt verified: upto %d, %d ranges above, %d readings confirmed, at %.6f",
                 upto, len(held), deleted, time.time())
        if self.on_receipt is not None:
            self.on_receipt(receipt, deleted)
        return {"confirmed": deleted, "upto": upto}

    def witness(self, box: Outbox) -> Any:
        from .witness import Witness  # lazily: the ledger.tlog imports are not on the start path

        # a restarted coordinator proves a reading again only once it is re-sent: never alarm before
        return Witness(self.cfg.data_dir, self.cfg.agent_id, box.db,
                       proof_timeout=max(self.cfg.witness_proof_timeout, 2 * self.cfg.resend_after))

    def witness_check(self, box: Outbox, part: Any, upto: int, ranges: list[tuple[int, int]]) -> Any:
        """Check the receipt's log checkpoint and proofs (agent/witness.py); queue the cosignature.
        A WitnessAlarm refuses the whole receipt: nothing is deleted."""
        from .witness import WitnessAlarm

        witness = self.witness(box)
        confirmed = box.stored_seqs(upto, ranges)
        try:
            verdict = witness.check(part, box.readings(confirmed))
        except WitnessAlarm as exc:
            raise AgentError(f"receipt refused by the witness check: {exc}") from None
        if verdict is not None:  # confirmed for long, never proven: an alarm (the readings stay)
            witness.track_unproven(confirmed, part, verdict, upto, ranges)
        if verdict is not None and verdict.cosignature is not None:
            box.add_task(WITNESS_COSIGN_TASK, cosign_task_id(self.cfg.agent_id, verdict.cosignature["size"]),
                         {"cosignature": verdict.cosignature})
            if self.forwarder is not None:
                self.forwarder.kick()
        return verdict

    def request_certificate_reload(self) -> None:
        """SIGHUP: only a flag here (signal context); the publishing thread does the work."""
        self._certificate_reload = True

    def _reload_certificate(self) -> None:
        """Sign with the newly installed certificate and reconnect the publisher with it.

        On any problem the current (still valid) certificate stays in use: one ERROR line."""
        self._certificate_reload = False
        from .identity import reload_certificate

        try:
            cert = reload_certificate(self.app, self.cfg)
        except AgentError as exc:
            log.error("SIGHUP: the installed certificate was not taken up (%s); still using the current one", exc)
            return
        self.reset_connection()  # the next connection presents the new certificate in its TLS handshake
        log.warning("SIGHUP: now signing with certificate serial %x (valid until %s); the consuming connection "
                    "presents it from its next reconnect", cert.serial_number, f"{cert.not_valid_after_utc:%Y-%m-%d}")

    def reset_connection(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # noqa: BLE001 - a dead socket may fail to close; it is gone anyway
                log.debug("closing producer connection: %s", exc)

    # -- commands (worker thread) ---------------------------------------
    def sample_now(self, sensor: str | None = None) -> list[dict]:
        self.require_fresh_crl()
        if sensor is not None and sensor not in {s.name for s in self.sensors}:
            raise AgentError(f"no sensor {sensor!r} on this agent: it has {', '.join(s.name for s in self.sensors)}")
        fwd = self.forwarder
        if fwd is None:
            raise AgentError("agent is not running: start it with `edge-agent run`")
        readings = fwd.sample(self.outbox(), only=sensor)
        fwd.kick()
        return readings

    def set_interval(self, seconds: float) -> dict:
        self.require_fresh_crl()
        seconds = float(seconds)
        if not seconds >= MIN_INTERVAL:
            raise AgentError(f"interval {seconds!r} too small: use at least {MIN_INTERVAL} seconds")
        self.interval = seconds
        self.outbox().set_meta("interval", repr(seconds))
        if self.forwarder is not None:
            self.forwarder.set_interval(seconds)
        return {"interval": seconds}

    def status(self, top: int = 10) -> dict:
        self.require_fresh_crl()
        stats = self.outbox().stats()
        diag: dict[str, Any] = {
            "agent_id": self.cfg.agent_id,
            "version": agent_version(),
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "interval": self.interval,
            "sensors": [s.name for s in self.sensors],
            "outbox_backlog": stats["backlog"],
            "outbox": stats,
            "witness": self.witness(self.outbox()).status(),
            "rss": rss_bytes(),
            "threads": threading.active_count(),
        }
        if tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot()
            diag["tracemalloc_top"] = [
                {"where": str(stat.traceback), "size": stat.size, "count": stat.count}
                for stat in snapshot.statistics("lineno")[:top]
            ]
        else:
            # Tracing costs memory on a small device: start it on demand; the next
            # status call shows what was allocated since.
            tracemalloc.start()
            diag["tracemalloc_top"] = []
            diag["tracemalloc"] = "started now; ask for status again to see top allocations"
        return diag

    def store_heartbeat(self, outbox: Outbox) -> None:
        """Queue an `edge.heartbeat` (replacing an unsent older one)."""
        now = time.time()
        status = {
            "agent_id": self.cfg.agent_id,
            "outbox_backlog": outbox.backlog(),
            "unconfirmed": outbox.unconfirmed(),  # published, no receipt yet
            "dropped": int(outbox.get_meta("dropped", "0")),  # lost to the outbox bound, ever
            "witness_alarms": int(outbox.get_meta("witness_alarms", "0")),  # agent/witness.py, ever
            "interval": self.interval,
            "version": agent_version(),
            "sent_at": now,
        }
        taken = takeover_state(outbox)
        if taken:  # another device with this agent id (agent.takeover)
            status["takeovers"] = int(taken.get("count") or 0)
            status["takeover_last_at"] = taken.get("last_at")
        outbox.replace_task(HEARTBEAT_TASK, heartbeat_task_id(self.cfg.agent_id, now), {"status": status})

    def report_command(self, command: str, command_task_id: str, status: str, result: Any) -> None:
        """Queue an `edge.command_result` through the outbox (same PUBACK guarantee)."""
        payload = {
            "agent_id": self.cfg.agent_id,
            "command_task_id": command_task_id,
            "command": command,
            "status": status,
            "result": result,
            "finished_at": time.time(),
        }
        self.outbox().add_task(
            COMMAND_RESULT_TASK, command_result_task_id(self.cfg.agent_id, command_task_id), {"result": payload}
        )
        if self.forwarder is not None:
            self.forwarder.kick()


__all__ = ["AgentRuntime", "INGEST_QUEUE", "INGEST_TASK", "rss_bytes"]
