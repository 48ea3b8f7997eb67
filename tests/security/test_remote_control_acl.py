"""The rendered broker ACLs give Celery's remote-control and event topics to coordinator
identities only, in both ACL modes (pure rendering; the broker's own verdict is in
tests/redteam/test_7_remote_control.py)."""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as paho
import pytest

from security.dynsec import COORDINATOR_ROLE, render_dynsec_config
from security.mosquitto_config import MosquittoSettings, render_acl

NODE = "coordinator@host"
CONTROL_TOPICS = (
    "kombu/f/celery.pidbox",                           # broadcast (inspect, control shutdown, revoke)
    f"kombu/d/amq.default/{NODE}.celery.pidbox",        # one worker's pidbox queue by name
    "kombu/d/reply.celery.pidbox/0a1b2c",               # replies to an operator's tool
    "kombu/t/celeryev/worker/heartbeat",                # events
    "kombu/t/celeryev/task/succeeded",
)


def _plain(topic_filter: str) -> str:
    """The filter a `$share/<group>/<filter>` grant subscribes (`$share/#`: any filter)."""
    if not topic_filter.startswith("$share/"):
        return topic_filter
    parts = topic_filter.split("/", 2)
    return parts[2] if len(parts) == 3 else "#"


def _granted(acls: list[dict], topic: str, kinds: tuple[str, ...]) -> bool:
    return any(a["allow"] and a["acltype"] in kinds and paho.topic_matches_sub(_plain(a["topic"]), topic) for a in acls)


@pytest.mark.parametrize("topic", CONTROL_TOPICS)
def test_dynsec_agents_get_no_control_or_event_topic_and_the_coordinator_does(topic: str) -> None:
    doc = render_dynsec_config(["dev-1", "dev-2"], ("coordinator",))
    roles = {r["rolename"]: r["acls"] for r in doc["roles"]}
    for agent in ("agent-dev-1", "agent-dev-2"):
        acls = roles[agent]
        assert not _granted(acls, topic, ("publishClientSend", "publishClientReceive")), (agent, topic)
        assert not _granted(acls, topic, ("subscribeLiteral", "subscribePattern")), (agent, topic)
    coordinator = roles[COORDINATOR_ROLE]
    assert _granted(coordinator, topic, ("publishClientSend",)) and _granted(coordinator, topic, ("publishClientReceive",))
    assert _granted(coordinator, topic, ("subscribePattern",))
    assert doc["defaultACLAccess"]["publishClientSend"] is False and doc["defaultACLAccess"]["subscribe"] is False


@pytest.mark.parametrize("topic", CONTROL_TOPICS)
def test_acl_file_patterns_give_agents_no_control_or_event_topic(topic: str, tmp_path: Path) -> None:
    settings = MosquittoSettings(cafile=tmp_path / "ca", certfile=tmp_path / "c", keyfile=tmp_path / "k",
                                 persistence=False, acl_mode="file")
    patterns = [line.split(" ", 2) for line in render_acl(settings).splitlines() if line.startswith("pattern ")]
    for _, _access, topic_filter in patterns:  # every certificate (an agent), %u = its CN
        assert not paho.topic_matches_sub(topic_filter.replace("%u", "dev-1"), topic), (topic_filter, topic)
    assert "user coordinator\ntopic readwrite #" in render_acl(settings)
