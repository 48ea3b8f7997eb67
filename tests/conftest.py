"""Shared fixtures: real brokers and chains on loopback, never mocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.mosquitto import MosquittoBroker, FleetPKI


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPKI:
    return FleetPKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory, test_pki: FleetPKI):
    """A session-wide Mosquitto with plain and mutual-TLS listeners on free ports."""
    broker = MosquittoBroker(workdir=tmp_path_factory.mktemp("mosquitto"), pki=test_pki).start()
    yield broker
    broker.stop()


@pytest.fixture
def fresh_mosquitto(tmp_path: Path, test_pki: FleetPKI):
    """A broker of the test's own, for tests that restart or kill it."""
    broker = MosquittoBroker(workdir=tmp_path / "mosquitto", pki=test_pki).start()
    yield broker
    broker.stop()
