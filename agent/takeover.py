"""Two devices with one agent id: recognised, reported, and slowed down instead of a storm.

Why: the agent's consuming MQTT session has a fixed client id (derived from its agent
id), so a second device running with the same identity files makes the broker close
the first one's session, which reconnects and closes the second's, several times a
second, forever; each side only saw "connection lost". kombu_mqtt.takeover recognises
the pattern and pauses the reconnects; this module names the cause in agent terms
(one ERROR per episode), keeps a mark in the outbox so `edge-agent status` shows it,
and puts it into the heartbeat so the coordinator (`agents`, metrics) sees it too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from .outbox import Outbox

log = logging.getLogger("edge.agent")

META_KEY = "takeover"
#: A new ERROR line when the last one is older than this (the storm is paused, not silent).
LOG_EVERY = 600.0


def cause(agent_id: str) -> str:
    return f"another device is connected with agent id {agent_id!r} (the broker keeps closing this one's connection)"


FIX = ("stop the other device, or give it its own identity (`edge-agent keygen --id NEW` on it, "
       "`edge-coordinator enroll CSR`, `edge-agent enroll`); if this device's key was copied, "
       "revoke the id (`edge-coordinator revoke ID`) and re-enroll both devices")


def takeover_state(box: Outbox) -> dict[str, Any] | None:
    """The persisted mark: {"count" (paused reconnects), "first_at", "last_at", "pause"}, or None."""
    raw = box.get_meta(META_KEY)
    if not raw:
        return None
    try:
        return dict(json.loads(raw))
    except (TypeError, ValueError):
        return None


class TakeoverReporter:
    """The transport's `on_takeover` hook for the agent's consuming session."""

    def __init__(self, agent_id: str, outbox: Callable[[], Outbox], clock: Callable[[], float] = time.time) -> None:
        self.agent_id = agent_id
        self._outbox = outbox
        self._clock = clock
        self._logged_at: float | None = None

    def __call__(self, client_id: str, suspected: int, pause: float) -> None:
        now = self._clock()
        box = self._outbox()
        state = takeover_state(box) or {"count": 0, "first_at": now}
        state.update(count=int(state.get("count") or 0) + 1, last_at=now, pause=pause)
        box.set_meta(META_KEY, json.dumps(state))
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.error("%s: its connection is closed again and again right after connecting (MQTT client id %s); "
                      "reconnecting only every %.0fs meanwhile. Fix: %s", cause(self.agent_id), client_id, pause, FIX)
