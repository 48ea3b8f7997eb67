"""The device settings the agent's Celery app runs with (what agent/README.md, "Settings" and "Behaviour", promises a device)."""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from agent.app import configure
from agent.config import AgentConfig


def test_device_settings(tmp_path: Path) -> None:
    cfg = AgentConfig(data_dir=tmp_path, agent_id="dev-1", broker_url="mqtts://127.0.0.1:8883",
                      broker_heartbeat=120, rate_limits={"edge.agent.sample_now": "5/m"})
    app = Celery("t", set_as_current=False)
    configure(app, cfg)
    c = app.conf
    assert (c.worker_pool, c.worker_concurrency, c.worker_prefetch_multiplier) == ("solo", 1, 1)
    assert c.task_default_queue == "agent.dev-1" and c.result_backend == "rpc://"
    assert c.broker_transport_options["client_id"] == "edge-agent-dev-1"
    assert c.broker_transport_options["keepalive"] == 120 and c.broker_heartbeat == 120
    assert c.broker_use_ssl["certfile"] == str(tmp_path / "agent.pem")
    assert c.task_annotations == {"edge.agent.sample_now": {"rate_limit": "5/m"}}
    assert c.worker_send_task_events is False and c.task_send_sent_event is False
    assert c.worker_enable_remote_control is False
    assert cfg.command_signers == ["coordinator"]
    ingest = next(q for q in c.task_queues if q.name == "edge.ingest")
    assert ingest.no_declare, "the agent must never subscribe to the coordinator's queue"
