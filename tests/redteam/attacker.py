"""The red team's toolbox: raw Celery protocol-2 messages signed with a stolen bundle.

Why raw: an attacker who holds one agent's certificate and key is not bound to our
Celery apps or to kombu. It can sign any payload with `security.envelope.sign_envelope`
(the exact shape `security.codec.Identity.encode` produces), wrap it in a
kombu message as the virtual transport does (base64 body, headers, properties) and
publish the bytes with paho-mqtt over mutual TLS straight to an MQTT topic
(docs/INTERFACES.md, kombu_mqtt/topics.py). Everything here is what such an attacker
can do; nothing here uses a code path of the system under test to send.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import threading
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from kombu.utils import json as kjson
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from security.envelope import certificate_pem, sign_envelope
from security.pki import load_certificate, load_private_key

PREFIX = "kombu"
CONTENT_TYPE = "application/x-edge-signed"
INGEST = "edge.ingest"
REPLY_EXCHANGE = "c.rep"
# uuid5 namespace of the wire contract's task ids (docs/INTERFACES.md, agent/outbox.py)
TASK_ID_NAMESPACE = uuid.UUID("6f1c1d2e-5b7a-4c5e-9a51-3c1f0e2d7a44")


def queue_topic(queue: str) -> str:
    """Where Celery publishes a task for queue Q (direct exchange Q, routing key Q)."""
    return f"{PREFIX}/d/{queue}/{queue}"


INGEST_TOPIC = queue_topic(INGEST)


def reply_topic(reply_to: str) -> str:
    return f"{PREFIX}/d/{REPLY_EXCHANGE}/{reply_to}"


def derived_id(agent_id: str, kind: str, key: Any) -> str:
    """The contract's task id: uuid5(namespace, "<agent_id>/<kind>/<key>")."""
    try:  # the shared wire contract, once it exists, is the authority
        from security import contract  # type: ignore[attr-defined]

        if kind == "reading":
            return str(contract.reading_task_id(agent_id, key))
        if kind == "command_result":
            return str(contract.command_result_task_id(agent_id, key))
    except ImportError:
        pass
    return str(uuid.uuid5(TASK_ID_NAMESPACE, f"{agent_id}/{kind}/{key}"))


def eta_in(seconds: float) -> str:
    """An ETA header as Celery writes it (aware UTC isoformat)."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


def signature(task: str, args: list | None = None, queue: str | None = None, **kwargs: Any) -> dict:
    """A Celery signature dict (what callbacks/errbacks/chain/chord carry)."""
    options = {"queue": queue} if queue else {}
    return {"task": task, "args": args or [], "kwargs": kwargs, "options": options, "subtask_type": None,
            "immutable": True, "chord_size": None}


@dataclass(frozen=True)
class Bundle:
    """An enrollment bundle (edge-coordinator enroll --bundle): what the attacker stole."""

    directory: Path
    agent_id: str
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def load(cls, directory: Path) -> Bundle:
        conf = tomllib.loads((directory / "agent.toml").read_text())
        return cls(directory=directory, agent_id=conf["agent_id"], cert=directory / conf["cert_file"],
                   key=directory / conf["key_file"], ca=directory / conf["ca_file"])


@dataclass
class Client:
    """One paho MQTT 5 connection over mutual TLS that records what the broker did."""

    mqtt: mqtt.Client
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    pubacks: dict[int, int] = field(default_factory=dict)
    subacks: dict[int, list[int]] = field(default_factory=dict)
    connect_rc: int | None = None
    disconnects: list[int] = field(default_factory=list)
    connected: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, topic: str, payload: bytes | dict, timeout: float = 15) -> int:
        """QoS 1 publish; returns the PUBACK reason code (0 ok, 0x10 no subscribers, 0x87 denied)."""
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        info = self.mqtt.publish(topic, data, qos=1)
        return _wait(lambda: self.pubacks.get(info.mid), timeout, f"PUBACK for {topic}")

    def subscribe(self, topic_filter: str, timeout: float = 15) -> list[int]:
        """SUBSCRIBE at QoS 1; returns the SUBACK reason codes (>= 0x80: refused)."""
        _, mid = self.mqtt.subscribe(topic_filter, qos=1)
        return _wait(lambda: self.subacks.get(mid), timeout, f"SUBACK for {topic_filter}")

    def received(self, topic_prefix: str = "") -> list[tuple[str, bytes]]:
        with self.lock:
            return [m for m in self.messages if m[0].startswith(topic_prefix)]

    @property
    def is_connected(self) -> bool:
        return self.mqtt.is_connected()

    def close(self) -> None:
        try:
            self.mqtt.disconnect()
        finally:
            self.mqtt.loop_stop()


def _wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value is not None:
            return value
        time.sleep(0.01)
    raise AssertionError(f"no answer from the broker within {timeout}s: {what}")


def connect(port: int, ca: Path, cert: Path, key: Path, *, client_id: str | None = None,
            clean_start: bool = True, session_expiry: int = 0, timeout: float = 15) -> Client:
    """Connect over mutual TLS; raises ConnectionError when the broker refuses (TLS or CONNACK)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"rt-{uuid.uuid4().hex[:10]}",
                         protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    client.tls_set_context(ctx)
    c = Client(mqtt=client)

    def on_connect(_c, _u, _f, rc, _p):
        c.connect_rc = rc.value
        c.connected.set()

    def on_message(_c, _u, msg):
        with c.lock:
            c.messages.append((msg.topic, bytes(msg.payload)))

    def on_publish(_c, _u, mid, rc, _p):
        c.pubacks[mid] = rc.value

    def on_subscribe(_c, _u, mid, rcs, _p):
        c.subacks[mid] = [r.value for r in rcs]

    def on_disconnect(_c, _u, _f, rc, _p):
        c.disconnects.append(rc.value)
        if not c.connected.is_set():
            c.connect_rc = rc.value or -1
            c.connected.set()

    def on_connect_fail(_c, _u):
        c.connect_rc = -1
        c.connected.set()

    client.on_connect, client.on_message, client.on_publish = on_connect, on_message, on_publish
    client.on_subscribe, client.on_disconnect, client.on_connect_fail = on_subscribe, on_disconnect, on_connect_fail
    client.reconnect_delay_set(3600, 3600)  # an attacker's reconnect is an explicit, observed new connect()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    try:
        client.connect("127.0.0.1", port, clean_start=clean_start, properties=props)
    except (ssl.SSLError, OSError) as exc:
        raise ConnectionError(f"TLS connection refused: {exc}") from exc
    client.loop_start()
    if not c.connected.wait(timeout) or c.connect_rc != 0:
        client.loop_stop()
        raise ConnectionError(f"connection refused (rc={c.connect_rc})")
    return c


@dataclass
class Attacker:
    """Agent A's stolen identity: signs whatever it likes and publishes raw."""

    bundle: Bundle
    port: int
    _client: Client | None = None

    @property
    def agent_id(self) -> str:
        return self.bundle.agent_id

    # -- connection ------------------------------------------------------------
    @property
    def client(self) -> Client:
        if self._client is None or not self._client.is_connected:
            self._client = self.connect()
        return self._client

    def connect(self, **kw: Any) -> Client:
        return connect(self.port, self.bundle.ca, self.bundle.cert, self.bundle.key, **kw)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def publish(self, topic: str, message: bytes | dict) -> int:
        return self.client.publish(topic, message)

    # -- signing ----------------------------------------------------------------
    def sign(self, kind: str, meta: dict | None, body: Any, sent_at: float | None = None) -> bytes:
        """The envelope `Identity.encode` would make for this identity."""
        payload = kjson.dumps({"kind": kind, "sent_at": time.time() if sent_at is None else sent_at,
                               "nonce": uuid.uuid4().hex, "meta": meta, "body": body})
        key = load_private_key(self.bundle.key)
        return sign_envelope(key, certificate_pem(load_certificate(self.bundle.cert)), payload.encode())

    def task(self, name: str, kwargs: dict | None = None, args: list | None = None, *,
             task_id: str | None = None, eta: str | None = None, expires: str | None = None,
             retries: int = 0, queue: str = INGEST, signed_routing_key: str | None = None,
             embed: dict | None = None, headers: dict | None = None, reply_to: str = "",
             sent_at: float | None = None) -> dict:
        """A kombu message carrying a protocol-2 task signed by this identity.

        headers: overrides/extra headers AFTER signing (header tampering).
        signed_routing_key: the routing key written into the signed meta (default: `queue`).
        """
        task_id = task_id or str(uuid.uuid4())
        args, kwargs = list(args or []), dict(kwargs or {})
        hdrs = {
            "lang": "py", "task": name, "id": task_id, "shadow": None, "eta": eta, "expires": expires,
            "group": None, "group_index": None, "retries": retries, "timelimit": [None, None],
            "root_id": task_id, "parent_id": None, "argsrepr": repr(args), "kwargsrepr": repr(kwargs),
            "origin": f"gen1@{self.agent_id}", "ignore_result": True, "replaced_task_nesting": 0,
            "stamped_headers": None, "stamps": {},
        }
        meta = {"task": name, "id": task_id, "eta": eta, "expires": expires, "retries": retries,
                "routing_key": queue if signed_routing_key is None else signed_routing_key}
        canvas = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        canvas.update(embed or {})
        envelope = self.sign("task", meta, [args, kwargs, canvas], sent_at=sent_at)
        hdrs.update(headers or {})
        return kombu_message(envelope, hdrs, queue, correlation_id=task_id, reply_to=reply_to)

    def reading_task(self, seq: int, *, claimed: str | None = None, task_id: str | None = None, **kw: Any) -> dict:
        """A well-formed edge.ingest; by default A's own reading under A's own derived id."""
        claimed = claimed or self.agent_id
        reading = {"agent_id": claimed, "sensor": "temp", "seq": seq, "value": 21.5, "unit": "C",
                   "sampled_at": time.time()}
        return self.task(INGEST, {"reading": reading},
                         task_id=task_id or derived_id(self.agent_id, "reading", seq), **kw)

    def result(self, task_id: str, result: Any, status: str = "SUCCESS") -> dict:
        """An rpc:// result message (kind "data"), as Celery's rpc backend sends one."""
        body = {"task_id": task_id, "status": status, "result": result, "traceback": None, "children": [],
                "date_done": dt.datetime.now(dt.UTC).isoformat()}
        envelope = self.sign("data", None, body)
        return kombu_message(envelope, {}, "", exchange=REPLY_EXCHANGE, correlation_id=task_id)


def kombu_message(body: bytes, headers: dict, routing_key: str, *, exchange: str | None = None,
                  correlation_id: str | None = None, reply_to: str = "",
                  content_type: str = CONTENT_TYPE) -> dict:
    """What kombu's virtual transport puts on the wire (body base64, delivery_info, ...)."""
    exchange = routing_key if exchange is None else exchange
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "binary",
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "correlation_id": correlation_id, "reply_to": reply_to, "delivery_mode": 2, "priority": 0,
            "body_encoding": "base64", "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def decode_message(payload: bytes) -> tuple[dict, dict]:
    """(kombu message, signed payload) of a captured wire message."""
    from security.envelope import signed_payload

    message = json.loads(payload)
    envelope = base64.b64decode(message["body"])
    return message, signed_payload(envelope)


def replay(envelope: bytes, queue: str = INGEST) -> dict:
    """Someone else's captured envelope, republished with the headers its signed meta names."""
    from security.envelope import signed_payload

    meta = signed_payload(envelope)["meta"]
    task_id = meta["id"]
    headers = {
        "lang": "py", "task": meta["task"], "id": task_id, "shadow": None, "eta": meta.get("eta"),
        "expires": meta.get("expires"), "group": None, "group_index": None, "retries": meta.get("retries") or 0,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None, "argsrepr": "()", "kwargsrepr": "{}",
        "origin": "replayer", "ignore_result": True,
    }
    return kombu_message(envelope, headers, queue, correlation_id=task_id)
