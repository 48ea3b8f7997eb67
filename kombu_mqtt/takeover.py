"""Recognising a client-id takeover storm on a fixed-id MQTT connection.

Why: MQTT allows one connection per client id; a second client connecting with the
same id makes the broker close the first (session takeover). Two processes sharing a
fixed id therefore kick each other off as fast as they reconnect, forever, and each
only sees "connection lost". An MQTT 5 broker may say so (DISCONNECT reason 0x8E), but
Mosquitto 2.0.x just closes the socket, so the pattern is the evidence: connections that
die within seconds of their CONNACK, again and again. After `threshold` of those within
`window` seconds the watcher reports once and asks for a growing pause before the next
reconnect, so one side holds the connection and the storm stops. The watch is kept per
client id for the whole process: Celery replaces the kombu connection (and with it the
session) after every loss, so a per-session count would never reach the threshold.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

#: A connection lost within this many seconds after its CONNACK counts as "kicked right after connecting".
SHORT_LIFETIME = 5.0
WINDOW = 60.0
#: 3, not more: Celery's consumer gives up after 5 restarts within 1 s, and every loss is a restart.
THRESHOLD = 3
PAUSE_MIN = 5.0
#: Below 1.5 x the default keepalive (60 s): other connections serviced by the same loop stay alive.
PAUSE_MAX = 60.0


class TakeoverWatch:
    """Feed it connects and losses of one fixed-id connection; it says how long to pause."""

    def __init__(self, *, threshold: int = THRESHOLD, window: float = WINDOW, short: float = SHORT_LIFETIME,
                 pause_min: float = PAUSE_MIN, pause_max: float = PAUSE_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold, self.window, self.short = threshold, window, short
        self.pause_min, self.pause_max = pause_min, pause_max
        self._clock = clock
        self._connected_at: float | None = None
        self._short_losses: deque[float] = deque()
        self._pause = 0.0
        self.suspected = 0  # losses that matched the pattern, ever
        self.episodes = 0  # times the pattern started (a long-lived connection ends an episode)
        self.pending = 0.0  # pause owed before the next connect (take_pause)

    def connected(self) -> None:
        self._connected_at = self._clock()

    def lost(self) -> float:
        """The connection just dropped: seconds to wait before reconnecting (0 unless the pattern holds)."""
        now = self._clock()
        started, self._connected_at = self._connected_at, None
        if started is None:
            return 0.0
        if now - started >= self.short:
            self._short_losses.clear()
            self._pause = 0.0
            return 0.0
        self._short_losses.append(now)
        while self._short_losses and now - self._short_losses[0] > self.window:
            self._short_losses.popleft()
        if len(self._short_losses) < self.threshold:
            return 0.0
        if self._pause == 0.0:
            self.episodes += 1
        self.suspected += 1
        self._pause = min(self.pause_max, max(self.pause_min, self._pause * 2))
        self.pending = self._pause
        return self._pause

    def take_pause(self) -> float:
        """The pause owed by the last loss (once): the next connect waits this long first."""
        pause, self.pending = self.pending, 0.0
        return pause


_WATCHES: dict[str, TakeoverWatch] = {}
_LOCK = threading.Lock()


def watch_for(client_id: str) -> TakeoverWatch:
    """The process-wide watch of one fixed client id."""
    with _LOCK:
        watch = _WATCHES.get(client_id)
        if watch is None:
            watch = _WATCHES[client_id] = TakeoverWatch()
        return watch
