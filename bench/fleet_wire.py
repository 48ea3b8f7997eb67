"""The bytes a simulated agent puts on the wire, made by the product's own code.

Why: the fleet harness drives hundreds of MQTT connections per process from one
selector loop with paho directly (a kombu connection per agent would cost a thread
and a Celery producer each), yet the coordinator must see exactly what a real agent
sends. So every reading goes through Celery's `send_task` and the agent's signing
serializer (security.celery_signing, one EC P-256 identity per agent), into a kombu
channel that only captures the augmented message instead of delivering it; the
topic comes from kombu_mqtt.topics and the payload is `kombu.utils.json.dumps` of
that message, as kombu_mqtt's `publish_message` does. Receipts are verified with the
product's Verifier.
"""

from __future__ import annotations

import base64
import json
import tomllib
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.transport import memory
from kombu.utils.json import dumps

from kombu_mqtt.topics import publish_topic
from security.contract import INGEST_QUEUE, INGEST_TASK, RECEIPT_TASK, reading_task_id
from security.signing_config import SigningConfig
from security.signing_setup import setup_signing
from security.verifier import Verifier

_CAPTURED: list[tuple[str, str, str, dict[str, Any]]] = []


class _CaptureChannel(memory.Channel):
    """Keeps the message kombu would publish (after kombu's own augmentation)."""

    def basic_publish(self, message: dict[str, Any], exchange: str, routing_key: str, **kwargs: Any) -> None:
        self._inplace_augment_message(message, exchange, routing_key)
        exchange_type = self.typeof(exchange).type if exchange else "direct"
        _CAPTURED.append((exchange, exchange_type, routing_key or "", message))


class CaptureTransport(memory.Transport):
    Channel = _CaptureChannel


class Bundle:
    """One enrollment bundle (`edge-coordinator enroll --bundle NAME`)."""

    def __init__(self, path: Path) -> None:
        conf = tomllib.loads((path / "agent.toml").read_text())
        self.path = path
        self.agent_id: str = conf["agent_id"]
        self.ca = path / conf.get("ca_file", "ca.pem")
        self.cert = path / conf.get("cert_file", f"{self.agent_id}.pem")
        self.key = path / conf.get("key_file", f"{self.agent_id}.key")
        self.crl = path / "crl.pem"


class WireEncoder:
    """Signed `edge.ingest` messages for many agents from one process."""

    def __init__(self, bundles: list[Bundle], scratch: Path, prefix: str = "kombu") -> None:
        self.prefix = prefix
        self.app = Celery("fleet-sim", broker="memory://", set_as_current=False)
        self.app.conf.update(broker_transport=CaptureTransport, task_ignore_result=True, task_publish_retry=False)
        self.serializer: dict[str, str] = {}
        scratch.mkdir(parents=True, exist_ok=True)
        for b in bundles:  # one serializer name per signing identity (security.celery_signing)
            ctx = setup_signing(self.app, SigningConfig(
                key_path=b.key, cert_path=b.cert, ca_path=b.ca, crl_path=b.crl if b.crl.exists() else None,
                replay_db=scratch / "replay.sqlite", quarantine_db=scratch / "quarantine.sqlite"))
            self.serializer[b.agent_id] = ctx.serializer
        first = bundles[0]
        self.verifier = Verifier(SigningConfig(key_path=first.key, cert_path=first.cert, ca_path=first.ca,
                                               crl_path=first.crl if first.crl.exists() else None,
                                               replay_db=scratch / "replay.sqlite",
                                               quarantine_db=scratch / "quarantine.sqlite"))

    def reading(self, agent_id: str, seq: int, reading: dict[str, Any]) -> tuple[str, bytes]:
        """(topic, payload) of one signed reading, as `SimAgent.ingest` would publish it."""
        _CAPTURED.clear()
        self.app.send_task(INGEST_TASK, kwargs={"reading": reading}, queue=INGEST_QUEUE,
                           task_id=reading_task_id(agent_id, seq), serializer=self.serializer[agent_id])
        exchange, exchange_type, routing_key, message = _CAPTURED.pop()
        return publish_topic(self.prefix, exchange, exchange_type, routing_key), dumps(message).encode()

    def receipt(self, payload: bytes, coordinator: str = "coordinator") -> dict[str, Any] | None:
        """The verified receipt in one MQTT message for an agent queue, or None if it is
        another task. Raises the product's SignatureRefused on a bad signature."""
        message = json.loads(payload)
        headers = message.get("headers") or {}
        if headers.get("task") != RECEIPT_TASK:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        vm = self.verifier.verify(body)
        if vm.signer.agent_id != coordinator:
            raise ValueError(f"receipt signed by {vm.signer.agent_id!r}, not the coordinator")
        _args, kwargs, _embed = vm.body()
        return kwargs["receipt"]
