"""A stand-in for the coordinator's ingest worker, run as a subprocess by the tests.

Why not the coordinator: the agent and the coordinator agree only through task names
and schemas (docs/INTERFACES.md). This worker consumes `edge.ingest` with signature
checks on (security.signing_setup) and appends every executed task as one JSON line
(task id, name, kwargs, signer CN) to $RECEIVER_OUT.

Run: python -m tests.agent.receiver   (settings from RECEIVER_* environment variables)
"""

from __future__ import annotations

import json
import os
import ssl
import sys
from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

OUT = Path(os.environ.get("RECEIVER_OUT", "received.jsonl"))
BROKER = os.environ.get("RECEIVER_BROKER", "")
CERT, KEY, CA = (os.environ.get(f"RECEIVER_{k}", "") for k in ("CERT", "KEY", "CA"))
STATE = Path(os.environ.get("RECEIVER_STATE", "."))

if BROKER.startswith("mqtt"):
    import kombu_mqtt  # noqa: F401  (registers mqtt:// and mqtts://)

app = Celery("test-receiver", broker=BROKER, backend="rpc://", set_as_current=False)
app.conf.update(
    broker_use_ssl={"ca_certs": CA, "certfile": CERT, "keyfile": KEY, "cert_reqs": ssl.CERT_REQUIRED}
    if BROKER.startswith("mqtts") else None,
    broker_transport_options={"client_id": "test-receiver-" + STATE.name, "reconnect_max_delay": 1.0},
    task_queues=[Queue("edge.ingest", Exchange("edge.ingest", "direct"), routing_key="edge.ingest")],
    task_default_queue="edge.ingest",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)

from security.signing_config import SigningConfig  # noqa: E402
from security.signing_setup import setup_signing  # noqa: E402

setup_signing(app, SigningConfig(key_path=Path(KEY), cert_path=Path(CERT), ca_path=Path(CA),
                                 replay_db=STATE / "replay.sqlite", quarantine_db=STATE / "quarantine.sqlite"))


def _record(task, kwargs: dict) -> None:
    signer = getattr(task.request, "signer", None)
    line = {"id": task.request.id, "task": task.name, "kwargs": kwargs,
            "signer": signer.agent_id if signer else None}
    with OUT.open("a") as fh:
        fh.write(json.dumps(line, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@app.task(name="edge.ingest", bind=True, shared=False)
def ingest(self, reading: dict) -> None:
    _record(self, {"reading": reading})


@app.task(name="edge.command_result", bind=True, shared=False)
def command_result(self, result: dict) -> None:
    _record(self, {"result": result})


@app.task(name="edge.heartbeat", bind=True, shared=False)
def heartbeat(self, status: dict) -> None:
    _record(self, {"status": status})


if __name__ == "__main__":
    worker = app.Worker(pool="solo", concurrency=1, queues=["edge.ingest"], hostname="receiver@test",
                        without_gossip=True, without_mingle=True, without_heartbeat=True,
                        loglevel=os.environ.get("RECEIVER_LOGLEVEL", "WARNING"), quiet=True, redirect_stdouts=False)
    from agent.app import wake_hub_on_shutdown

    wake_hub_on_shutdown(worker)  # stop at once on SIGTERM (see agent.app)
    worker.start()
    sys.exit(worker.exitcode or 0)
