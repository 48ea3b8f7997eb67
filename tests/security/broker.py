"""A Mosquitto started from security.mosquitto_config (ACLs + CRL), plus paho helpers."""

from __future__ import annotations

import signal
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ledger.processes import ChildProcess
from security.mosquitto_config import MosquittoSettings, write_mosquitto_files
from tests.support.mosquitto import broker_log, launch_mosquitto
from tests.support.net import free_port


@dataclass
class FleetBroker:
    workdir: Path
    settings: MosquittoSettings
    process: ChildProcess | None = None

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def start(self) -> FleetBroker:
        conf = write_mosquitto_files(self.settings, self.workdir)
        self.process = launch_mosquitto(conf, self.workdir, (self.port,), timeout=15)
        return self

    def log(self) -> str:
        return broker_log(self.workdir)

    def is_running(self) -> bool:
        return self.process is not None and self.process.alive()

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its config (and TLS files) without dropping sessions."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.process = None


def fleet_broker(workdir: Path, ca: Path, cert: Path, key: Path, crl: Path | None, **kw) -> FleetBroker:
    settings = MosquittoSettings(cafile=ca, certfile=cert, keyfile=key, crlfile=crl, port=free_port(),
                                 persistence=False, **kw)
    workdir.mkdir(parents=True, exist_ok=True)
    return FleetBroker(workdir=workdir, settings=settings).start()


@dataclass
class Probe:
    """A paho MQTT 5 client over mutual TLS that records what happens to it."""

    client: mqtt.Client
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    pubacks: dict[int, int] = field(default_factory=dict)
    subacks: dict[int, list[int]] = field(default_factory=dict)
    connected: threading.Event = field(default_factory=threading.Event)
    connect_rc: int | None = None
    disconnects: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def subscribe(self, topic: str, timeout: float = 10) -> list[int]:
        _, mid = self.client.subscribe(topic, qos=1)
        return wait_for(lambda: self.subacks.get(mid), timeout)

    def publish(self, topic: str, payload: bytes, timeout: float = 10) -> int:
        info = self.client.publish(topic, payload, qos=1)
        return wait_for(lambda: self.pubacks.get(info.mid), timeout, allow_zero=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(pred, timeout: float = 10, allow_zero: bool = False):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value is not None and (allow_zero or value):
            return value
        time.sleep(0.01)
    raise AssertionError(f"no answer from the broker within {timeout}s")


def probe(port: int, ca: Path, cert: Path, key: Path, client_id: str | None = None,
          clean_start: bool = True, session_expiry: int = 0, wait: bool = True) -> Probe:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    client.tls_set_context(ctx)
    p = Probe(client=client)

    def on_connect(_c, _u, _f, rc, _props):
        p.connect_rc = rc.value
        p.connected.set()

    def on_message(_c, _u, msg):
        with p.lock:
            p.messages.append((msg.topic, msg.payload))

    def on_publish(_c, _u, mid, rc, _props):
        p.pubacks[mid] = rc.value

    def on_subscribe(_c, _u, mid, rcs, _props):
        p.subacks[mid] = [r.value for r in rcs]

    def on_disconnect(_c, _u, _f, rc, _props):
        p.disconnects.append(rc.value)
        if not p.connected.is_set():
            p.connect_rc = rc.value if rc.value else -1
            p.connected.set()

    def on_connect_fail(_c, _u):
        p.connect_rc = -1
        p.connected.set()

    client.on_connect, client.on_message, client.on_publish, client.on_subscribe = (
        on_connect, on_message, on_publish, on_subscribe)
    client.on_disconnect, client.on_connect_fail = on_disconnect, on_connect_fail
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    try:
        client.connect("127.0.0.1", port, clean_start=clean_start, properties=props)
    except (ssl.SSLError, OSError) as exc:
        raise ConnectionError(f"TLS connect refused: {exc}") from exc
    client.loop_start()
    if wait:
        if not p.connected.wait(15) or p.connect_rc != 0:
            client.loop_stop()
            raise ConnectionError(f"connect refused (rc={p.connect_rc})")
    return p


def signing_fleet_broker(signing_pki, workdir: Path, **kw) -> FleetBroker:
    """A fleet broker on the `signing_pki` fixture's CA, server key and CRL."""
    fleet = signing_pki.fleet
    return fleet_broker(workdir, fleet.ca_path, fleet.server_cert, fleet.server_key, signing_pki.crl_path, **kw)


def connect_as(broker: FleetBroker, signing_pki, name: str, **kw) -> Probe:
    """A raw MQTT client over TLS with the certificate of fleet identity `name`."""
    ident = signing_pki.identity(name)
    return probe(broker.port, signing_pki.ca_path, ident.cert, ident.key, **kw)
