"""Attacks on Celery remote control and events: an agent identity trying to command the
coordinator's worker (`shutdown` through the pidbox), to forge or read events, or to
read the operators' control replies. The coordinator's worker answers remote control
(`celery -A coordinator.tooling ...`), so only the broker's ACL stands between an
agent's certificate and that door (security/README.md "Remote control")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tests.coordinator.support import ROOT

from .attacker import PREFIX, kombu_message
from .fleet import VICTIM, Fleet, settle

pytestmark = pytest.mark.slow

NODE = f"coordinator@{socket.gethostname()}"
PIDBOX = f"{PREFIX}/f/celery.pidbox"                       # Celery's broadcast (fanout) exchange
NODE_PIDBOX = f"{PREFIX}/d/amq.default/{NODE}.celery.pidbox"  # the worker's pidbox queue, by name
REPLIES = f"{PREFIX}/d/reply.celery.pidbox"                 # operators' control replies
EVENTS = f"{PREFIX}/t/celeryev"                             # Celery's event (topic) exchange
REFUSED = 0x80


def ping(fleet: Fleet) -> dict:
    """`celery -A coordinator.tooling inspect ping --json` as the operator runs it."""
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "coordinator.tooling", "inspect", "ping", "--json",
                          "-t", "10"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "EDGE_COORDINATOR_DATA_DIR": str(fleet.data_dir)})
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))


def test_agent_cannot_subscribe_to_pidbox_events_or_control_replies(fleet: Fleet) -> None:
    a = fleet.attacker().connect()
    fleet.clients.append(a)
    filters = (PIDBOX, f"$share/x/{PIDBOX}", NODE_PIDBOX, f"$share/{NODE}.celery.pidbox/{NODE_PIDBOX}",
               f"{REPLIES}/#", f"{EVENTS}/#", f"$share/ev/{EVENTS}/#", f"{EVENTS}/task/succeeded")
    codes = {f: a.subscribe(f) for f in filters}
    granted = {f: c for f, c in codes.items() if not all(code >= REFUSED for code in c)}
    assert not granted, f"the broker granted the agent: {granted}"


def test_agent_signed_shutdown_and_forged_events_are_refused_and_the_worker_keeps_answering(fleet: Fleet) -> None:
    assert set(ping(fleet)) == {NODE}  # the door exists: the coordinator answers its operator (agents do not)
    watch = fleet.observer()  # the coordinator's identity: sees whatever would reach the pidbox or events
    for topic_filter in (PIDBOX, NODE_PIDBOX, f"{EVENTS}/#"):
        assert watch.subscribe(topic_filter) == [1]
    a = fleet.attacker()
    marker = uuid.uuid4().hex
    # what kombu's Mailbox publishes for `celery control shutdown`, signed with the agent's valid key
    control = {"method": "shutdown", "arguments": {}, "destination": None, "pattern": None, "matcher": None,
               "marker": marker}
    command = kombu_message(a.sign("data", None, control), {"clock": 1, "expires": time.time() + 30}, "",
                            exchange="celery.pidbox")
    event = {"hostname": NODE, "type": "worker-offline", "timestamp": time.time(), "marker": marker}
    attempts = {
        PIDBOX: command,
        NODE_PIDBOX: command,
        f"{EVENTS}/worker/offline": kombu_message(json.dumps(event).encode(), {}, "worker.offline",
                                                  exchange="celeryev", content_type="application/json"),
    }
    codes = {topic: a.publish(topic, message) for topic, message in attempts.items()}
    assert all(code >= REFUSED for code in codes.values()), f"the broker accepted the agent's publish: {codes}"
    # no effect: nothing of the attacker's reached the pidbox or the event stream, and the
    # worker still answers (a shutdown that got through would have stopped it)
    settle(fleet, lambda: set(ping(fleet)) == {NODE}, 60, "the coordinator answering ping after the attempt")
    assert [t for t, payload in watch.received() if marker.encode() in payload] == []
    assert fleet.coordinator.healthy()
    assert fleet.status_of(VICTIM)["agent_id"] == VICTIM  # the fleet works on
