"""The test broker itself works: TLS with a client certificate, plain on loopback."""

from __future__ import annotations

import ssl
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.mosquitto import FleetPKI, MosquittoBroker


def _roundtrip(client: mqtt.Client, port: int) -> bytes:
    got: list[bytes] = []
    done = threading.Event()

    def on_message(_c, _u, msg):
        got.append(msg.payload)
        done.set()

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe("t/echo", qos=1)[1]
        client.publish("t/echo", b"hello", qos=1).wait_for_publish(5)
        assert done.wait(5), "message did not come back"
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0]


def test_tls_listener_requires_and_accepts_client_certificate(mosquitto: MosquittoBroker, test_pki: FleetPKI) -> None:
    cert, key = test_pki.client("fixture-check")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id="fixture-check")
    client.tls_set(ca_certs=str(test_pki.ca_path), certfile=str(cert), keyfile=str(key), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    assert _roundtrip(client, mosquitto.tls_port) == b"hello"


def test_tls_listener_refuses_client_without_certificate(mosquitto: MosquittoBroker, test_pki: FleetPKI) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id="no-cert")
    client.tls_set(ca_certs=str(test_pki.ca_path), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    refused = False
    try:
        client.connect("127.0.0.1", mosquitto.tls_port)
        client.loop(timeout=2)
        client.loop(timeout=2)
        refused = not client.is_connected()
    except (ssl.SSLError, OSError):
        refused = True
    assert refused
