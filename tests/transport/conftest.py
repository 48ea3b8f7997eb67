"""Fixtures for kombu_mqtt tests: kombu connection factories over the real Mosquitto."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from kombu import Connection

import kombu_mqtt  # noqa: F401  (registers mqtt:// and mqtts://)


@pytest.fixture(params=["plain", "tls"])
def connect(request: pytest.FixtureRequest, mosquitto, test_pki) -> Iterator[Callable[..., Connection]]:
    """Factory of connected kombu Connections (plain and mutual TLS); all closed at teardown."""
    opened: list[Connection] = []

    def factory(**transport_options) -> Connection:
        if request.param == "tls":
            conn = Connection(mosquitto.tls_url, ssl=test_pki.ssl_options("kombu-test"), transport_options=transport_options)
        else:
            conn = Connection(mosquitto.plain_url, transport_options=transport_options)
        conn.connect()
        opened.append(conn)
        return conn

    yield factory
    for conn in opened:
        conn.release()


@pytest.fixture
def unique() -> str:
    """A fresh name per test: queues and client ids live on in the session-wide broker."""
    return f"t{uuid.uuid4().hex[:10]}"
