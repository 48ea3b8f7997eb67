"""The receipt sender against a real Mosquitto: one held connection for all receipts.

Why a test of its own: kombu replaces a pooled connection after any publish error, so
before the sender held its own connection every receipt to an agent without a broker
session (NoSubscribersError) opened a new one (a TLS handshake per receipt at scale).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection, Consumer, Exchange, Queue

import kombu_mqtt.client
from coordinator.broker import LoopbackBroker
from coordinator.receipts import ReceiptBook, ReceiptSender
from security.contract import agent_queue
from security.pki import LoopbackPKI


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LoopbackBroker]:
    running = LoopbackBroker(tmp_path / "broker", LoopbackPKI.create(tmp_path / "pki")).start()
    yield running
    running.stop()


def test_receipts_share_one_connection_even_when_agents_have_no_session(broker: LoopbackBroker, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    queue = Queue(agent_queue("has-session"), Exchange("", "direct"), routing_key=agent_queue("has-session"))
    listener = Connection(broker.plain_url, transport_options={"client_id": "has-session"})
    with Consumer(listener, [queue], callbacks=[lambda body, msg: msg.ack()]):
        try:
            listener.drain_events(timeout=0.3)
        except TimeoutError:
            pass
    listener.release()  # its persistent session keeps the queue

    connects: list[str] = []
    connect_once = kombu_mqtt.client.MqttSession._connect_once

    def counted(session: kombu_mqtt.client.MqttSession) -> None:
        connects.append(session.client_id)
        connect_once(session)

    monkeypatch.setattr(kombu_mqtt.client.MqttSession, "_connect_once", counted)
    journal = tmp_path / "journal.db"
    sqlite3.connect(journal).close()  # nothing journaled yet: receipts carry the noted seqs
    book = ReceiptBook(journal)
    for n in range(5):
        book.note(f"no-session-{n}", 1)
    book.note("has-session", 1)
    app = Celery("receipts-test", broker=broker.plain_url, set_as_current=False)
    sender = ReceiptSender(book, lambda: app)
    with app.connection_for_write() as conn:
        sender.send_due(app, conn)
        for n in range(5):  # a second round: the five agents are still without a session
            book.note(f"no-session-{n}", 2)
        sender.send_due(app, conn)
    assert sender.sent == 1  # the one agent with a session got its receipt
    assert len(connects) == 1, connects  # eleven receipts, ten refused by the broker, one connection


def test_a_round_of_receipts_is_pipelined_and_confirmed_once_or_sent_again(broker: LoopbackBroker, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No receipt waits for its own PUBACK (one broker round trip each capped a fleet at
    ~25 receipts/s); the round is confirmed together. When the broker did not take the
    round, every agent in it gets a receipt again next round."""
    awaited: list[int] = []
    confirms: list[int] = []
    wait_for = kombu_mqtt.client.MqttSession._wait_for
    confirm = kombu_mqtt.client.MqttSession.confirm_publishes

    def counted_wait(session: kombu_mqtt.client.MqttSession, mid: int, timeout: float, what: str) -> object:
        if what.startswith("PUBACK"):
            awaited.append(mid)
        return wait_for(session, mid, timeout, what)

    def counted_confirm(session: kombu_mqtt.client.MqttSession, timeout: float = 30.0) -> int:
        confirms.append(1)
        return confirm(session, timeout)

    monkeypatch.setattr(kombu_mqtt.client.MqttSession, "_wait_for", counted_wait)
    monkeypatch.setattr(kombu_mqtt.client.MqttSession, "confirm_publishes", counted_confirm)
    journal = tmp_path / "journal.db"
    sqlite3.connect(journal).close()
    book = ReceiptBook(journal)
    agents = [f"fleet-{n}" for n in range(40)]
    for agent in agents:
        book.note(agent, 1)
    app = Celery("receipts-round", broker=broker.plain_url, set_as_current=False)
    sender = ReceiptSender(book, lambda: app)
    with app.connection_for_write() as conn:
        sender.send_due(app, conn)
        assert awaited == [] and len(confirms) == 1  # forty receipts, one confirmation
        assert sender.sent == 0  # none of these agents has a session: the broker dropped them all, counted

        def lost(session: kombu_mqtt.client.MqttSession, timeout: float = 30.0) -> int:
            raise kombu_mqtt.MqttConnectionError("connection lost: send them again")

        monkeypatch.setattr(kombu_mqtt.client.MqttSession, "confirm_publishes", lost)
        for agent in agents:
            book.note(agent, 2)
        sender.send_due(app, conn)  # the broker's answer never came
    assert {r["agent_id"] for r in book.take()} == set(agents)  # all of them are due again
