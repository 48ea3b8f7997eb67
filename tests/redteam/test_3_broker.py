"""Attacks at the broker: stealing the coordinator's ingest stream or B's commands by
subscribing (shared-subscription groups included), and a revoked agent that keeps
its open connection. Needs `broker.acl_mode = "dynsec"` (Mosquitto's acl_file grants
every SUBSCRIBE)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.config import load_config
from tests.coordinator.support import cli

from .attacker import INGEST_TOPIC, queue_topic
from .fleet import REVOKED_LIVE, VICTIM, Fleet, settle

pytestmark = pytest.mark.slow

VQ = f"agent.{VICTIM}"
STOLEN_FILTERS = (
    f"$share/edge.ingest/{INGEST_TOPIC}",              # the coordinator's ingest group
    "$share/edge.ingest/kombu/d/amq.default/edge.ingest",
    INGEST_TOPIC,                                       # a plain copy of every reading
    f"$share/{VQ}/{queue_topic(VQ)}",                   # B's own group: takes B's commands
    f"$share/{VQ}/kombu/d/amq.default/{VQ}",
    queue_topic(VQ),
    "kombu/d/c.rep/#",                                  # everyone's rpc results
    "#",
    "$share/anything/#",
    "$CONTROL/dynamic-security/#",
)
REFUSED = 0x80


def test_default_acl_mode_is_dynsec(tmp_path: Path) -> None:
    data = tmp_path / "fresh"
    out = cli("init", "--data-dir", str(data), "--broker-port", "18883", "--chain-port", "18545",
              "--http-port", "19464")
    assert out.returncode == 0, out.stderr
    assert load_config(data_dir=data, require_file=True).broker.acl_mode == "dynsec"


def test_attacker_subscriptions_are_refused_and_the_victim_loses_nothing(fleet: Fleet) -> None:
    start = fleet.victim.next_seq()
    a = fleet.attacker().connect()
    fleet.clients.append(a)
    codes = {f: a.subscribe(f) for f in STOLEN_FILTERS}
    granted = {f: c for f, c in codes.items() if not all(code >= REFUSED for code in c)}
    assert not granted, f"the broker granted the attacker: {granted}"
    # while the attacker holds its connection (and would hold any granted share), B's
    # next readings all reach the journal: exact count from the seq we started at
    settle(fleet, lambda: fleet.victim.next_seq() >= start + 10, 60, f"{VICTIM} making 10 more readings")
    assert fleet.victim_lossless(since=start, timeout=45) >= 10
    assert a.is_connected and a.received() == []


def test_revoked_agent_loses_its_live_connection_and_cannot_reconnect(fleet: Fleet) -> None:
    victim = fleet.attacker(REVOKED_LIVE)
    live = victim.connect()
    fleet.clients.append(live)
    own = f"agent.{REVOKED_LIVE}"
    assert live.subscribe(f"$share/{own}/{queue_topic(own)}") == [1]  # it had its rights
    out = cli("revoke", "--data-dir", str(fleet.data_dir), REVOKED_LIVE)
    assert out.returncode == 0, out.stderr
    # "at once": by the time revoke returned, the broker has dropped the connection
    settle(fleet, lambda: live.disconnects or not live.is_connected, 10, "the revoked agent's connection cut")

    def refused() -> bool:
        try:
            again = victim.connect()
        except ConnectionError:
            return True
        again.close()
        return False

    settle(fleet, refused, 20, "the revoked agent's reconnect refused")


def test_stealing_the_victims_client_id_leaks_nothing_and_loses_nothing(fleet: Fleet) -> None:
    """A connects with B's durable client id (resuming B's session), then leaves with a
    session expiry of 0 (which would end that session). Whatever the broker does with
    it (refuse it, or let it kick B), A receives nothing of B's, B's readings all
    arrive, and B answers the operator again."""
    start = fleet.victim.next_seq()
    a = fleet.attacker()
    try:
        thief = a.connect(client_id=f"edge-agent-{VICTIM}", clean_start=False, session_expiry=0)
    except ConnectionError:
        thief = None
    if thief is not None:
        fleet.clients.append(thief)
        assert thief.received() == []
        thief.close()
        assert thief.received() == [], "the thief got B's messages"

    def answers() -> bool:
        out = fleet.send(VICTIM, "status", timeout=10)
        return out.returncode == 0 and json.loads(out.stdout)["result"]["agent_id"] == VICTIM

    settle(fleet, answers, 90, f"{VICTIM} answering commands again after the client-id theft")
    settle(fleet, lambda: fleet.victim.next_seq() >= start + 5, 60, f"{VICTIM} making 5 more readings")
    assert fleet.victim_lossless(since=start, timeout=45) >= 5
