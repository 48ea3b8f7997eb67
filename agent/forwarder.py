"""The sampling schedule and the outbox flusher: two threads inside the worker process.

Why threads and not beat or a Hub timer: no extra process, independent of the event
loop the transport uses, and each sleeps in a single `Event.wait(timeout)`: the
sampler wakes once per sampling interval, the flusher only when kicked (a new row) or
when a retry is due. Two threads, because a publish can block on the network for
seconds while the broker is away, and sampling must keep its schedule meanwhile.
Publishing from the worker's own connection is not possible (the solo pool may be
running a command), so the flusher owns a separate producer connection (a unique,
clean MQTT session), closed when it would otherwise sit idle past a keepalive.

Order: rows leave in store order; a row is marked published only after its publish
returned, i.e. after the broker's PUBACK. With `await_receipts` a reading stays until
the coordinator's receipt (Outbox.confirm, called by the worker thread) and the
flusher wakes again when the oldest unconfirmed one is due for a re-send. On failure
the connection is dropped and the flush is retried after a jittered exponential
backoff; new samples keep accumulating meanwhile.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from kombu_mqtt.backoff import Backoff
from security.contract import INGEST_TASK

from .outbox import Outbox
from .sensors import Sensor

log = logging.getLogger("edge.agent.forwarder")


class Forwarder:
    """Samples every `interval` seconds into the outbox and flushes it to the broker.

    `publish(item)` must return only once the broker has the message (PUBACK) and
    raise otherwise; `reset_connection()` drops the (possibly broken) connection.
    """

    def __init__(
        self,
        *,
        outbox_factory: Callable[[], Outbox],
        sensors: list[Sensor],
        interval: float,
        publish: Callable[[Any], None],
        reset_connection: Callable[[], None],
        backoff: Backoff,
        flush_batch: int = 200,
        idle_close_after: float = 60.0,
        heartbeat: Callable[[Outbox], None] | None = None,
        heartbeat_interval: float = 0.0,
        on_idle: Callable[[], object] | None = None,
        await_receipts: bool = False,
    ) -> None:
        self.outbox_factory = outbox_factory
        self.sensors = sensors
        self.interval = interval
        self.publish = publish
        self.reset_connection = reset_connection
        self.backoff = backoff
        self.flush_batch = flush_batch
        self.idle_close_after = idle_close_after
        self.heartbeat = heartbeat
        self.heartbeat_interval = heartbeat_interval if heartbeat is not None else 0.0
        self.on_idle = on_idle  # called when the flusher goes to sleep for longer than a keepalive
        self.await_receipts = await_receipts  # readings leave on the coordinator's receipt, not on PUBACK
        self.next_resend: float | None = None  # monotonic time an unconfirmed reading is due again
        self._kick = threading.Event()  # wakes the flusher
        self._tick = threading.Event()  # wakes the sampler (interval changed, stop)
        self._stopping = threading.Event()
        self._sensor_lock = threading.Lock()  # sample_now runs in the worker thread
        self._online = True
        self.flushed = threading.Event()  # set whenever the outbox became empty
        self._threads = [
            threading.Thread(target=self._sampler, name="edge-agent-sampler", daemon=True),
            threading.Thread(target=self._flusher, name="edge-agent-flusher", daemon=True),
        ]

    # -- control from other threads -------------------------------------
    def start(self) -> None:
        for t in self._threads:
            t.start()

    def kick(self) -> None:
        """Flush now (something was stored)."""
        self._kick.set()

    def set_interval(self, seconds: float) -> None:
        self.interval = seconds
        self._tick.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._kick.set()
        self._tick.set()
        for t in self._threads:
            if t.is_alive() and threading.current_thread() is not t:
                t.join(timeout)

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # -- sampler ----------------------------------------------------------
    def _sampler(self) -> None:
        """Samples on schedule; also stores a heartbeat every `heartbeat_interval`."""
        outbox = self.outbox_factory()
        try:
            next_at = time.monotonic()  # first sample right away
            hb_every = self.heartbeat_interval
            next_hb = time.monotonic() + hb_every if hb_every > 0 else float("inf")
            while not self._stopping.is_set():
                now = time.monotonic()
                if now >= next_at:
                    try:
                        if self.sample(outbox):
                            self.kick()
                    except sqlite3.Error as exc:  # disk full, locked: skip this sample, keep the schedule
                        log.error("cannot store readings in %s: %s", getattr(outbox, "path", "outbox"), exc)
                    next_at = max(next_at + self.interval, now + self.interval / 2)
                if now >= next_hb and self.heartbeat is not None:
                    try:
                        self.heartbeat(outbox)
                        self.kick()
                    except Exception as exc:  # noqa: BLE001 - a heartbeat is best effort; sampling goes on
                        log.warning("heartbeat not stored: %s", exc)
                    next_hb = now + hb_every
                wake = min(next_at, next_hb)
                if self._tick.wait(max(0.0, wake - time.monotonic())):
                    self._tick.clear()
                    next_at = min(next_at, time.monotonic() + self.interval)
        finally:
            outbox.close()

    def sample(self, outbox: Outbox, only: str | None = None) -> list[dict]:
        samples = []
        with self._sensor_lock:
            for sensor in self.sensors:
                if only and sensor.name != only:
                    continue
                try:
                    samples.extend(sensor.read())
                except Exception as exc:  # noqa: BLE001 - a broken driver must not stop the others
                    log.warning("sensor %s failed: %s", sensor.name, exc)
            return outbox.add_samples(samples) if samples else []

    # -- flusher ----------------------------------------------------------
    def _flusher(self) -> None:
        outbox = self.outbox_factory()
        try:
            retry_at: float | None = None
            while not self._stopping.is_set():
                if retry_at is None or time.monotonic() >= retry_at:
                    try:
                        retry_at = self.flush(outbox)
                    except sqlite3.Error as exc:  # the outbox itself failed: try again later
                        log.error("cannot read the outbox %s: %s", getattr(outbox, "path", "outbox"), exc)
                        retry_at = time.monotonic() + self.backoff.next()
                    if retry_at is None and self.interval >= self.idle_close_after:
                        # Nothing to send for longer than a keepalive: close the producer
                        # connection instead of waking up to ping it; reconnect next time.
                        self.reset_connection()
                        if self.on_idle is not None:
                            self.on_idle()
                wake = retry_at if retry_at is not None else self.next_resend
                timeout = None if wake is None else max(0.0, wake - time.monotonic())
                if self._kick.wait(timeout):
                    self._kick.clear()
        finally:
            outbox.close()
            self.reset_connection()

    def flush(self, outbox: Outbox) -> float | None:
        """Send the backlog in order. Returns None when empty, else when to retry (after a
        failed publish). Sets `next_resend` (monotonic) to when the oldest unconfirmed
        reading is due again, None if none is.

        Publish failures never escape; outbox (sqlite3) errors do, to the loop."""
        sent = 0
        while not self._stopping.is_set():
            items = outbox.pending(self.flush_batch)
            if not items:
                self.flushed.set()
                break
            self.flushed.clear()
            for item in items:
                if self._stopping.is_set():
                    return None
                try:
                    self.publish(item)
                except Exception as exc:  # noqa: BLE001 - any publish failure means: keep the row, retry later
                    delay = self.backoff.next()
                    if self._online:
                        log.warning("broker unreachable, %d rows kept, retrying in %.1fs: %s",
                                    outbox.backlog(), delay, exc)
                    self._online = False
                    self.reset_connection()
                    return time.monotonic() + delay
                outbox.mark_sent(item.id, awaits_receipt=self.await_receipts and item.task_name == INGEST_TASK)
                sent += 1
        if not self._online:
            log.warning("broker reachable again: %d rows sent", sent)
        self._online = True
        self.backoff.reset()
        due = outbox.next_resend_at() if self.await_receipts else None
        self.next_resend = None if due is None else time.monotonic() + max(0.0, due - time.time())
        return None
