"""Shared fixtures: real brokers and chains on loopback, never mocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.mosquitto import FleetPKI, MosquittoBroker


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


@pytest.fixture(scope="session")
def anvil(tmp_path_factory: pytest.TempPathFactory):
    """A session-wide local chain (real anvil on a free loopback port).

    Yields a ledger.anvil.ManagedAnvil: `.rpc_url`, `.private_keys`, `.addresses`,
    `.dev_key`. Use your own key index per test module to avoid sharing a nonce; a key
    reuses its contract (deterministic address), so a fresh journal that must audit clean
    needs its own key or its own contract (ledger.deploy.deploy_contract -> contract_address).
    """
    from tests.support.anvil import start_anvil

    with start_anvil(tmp_path_factory.mktemp("anvil")) as chain:
        yield chain


@pytest.fixture(autouse=True)
def _celery_apps_outlive_their_tests():
    """Keep every Celery app made in a test referenced until the session ends.

    Why: Celery names an app's rpc:// reply queue after `id(app)`, and an app's pooled
    connections outlive it in kombu's process-global pools. If a dead app's id were
    reused, a later app would share its reply queue with a stale connection.
    """
    yield
    from celery._state import _apps

    from tests.support.celery_apps import keep_alive

    for app in list(_apps):
        keep_alive(app)
