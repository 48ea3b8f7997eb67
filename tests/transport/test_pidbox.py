"""kombu's Mailbox (Celery remote control) over the real Mosquitto: a broadcast reaches
every node, every reply reaches the caller, a destination limits who answers.

Each node runs in its own thread on its own connection, as separate workers would;
the caller uses kombu's own `_broadcast` (what `celery inspect` calls), which declares
its reply queue right before publishing the request.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, pidbox


class NodeThread:
    """One mailbox node draining its own connection until stopped."""

    def __init__(self, mailbox: pidbox.Mailbox, conn: Connection, name: str) -> None:
        handlers: dict[str, Any] = {"ping": lambda state, **_: {"pong": name}}
        self.node = mailbox(conn).Node(name, channel=conn.default_channel, handlers=handlers)
        self.node.listen()
        self.conn = conn
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


@pytest.fixture
def nodes(connect, unique) -> Iterator[tuple[pidbox.Mailbox, dict[str, NodeThread]]]:
    mailbox = pidbox.Mailbox(unique, type="fanout", accept=["json"])
    running = {name: NodeThread(mailbox, connect(), name) for name in (f"{unique}-1", f"{unique}-2")}
    yield mailbox, running
    for node in running.values():
        node.close()


def test_broadcast_with_replies_from_every_node(connect, nodes) -> None:
    mailbox, running = nodes
    caller = mailbox(connect())
    replies = caller._broadcast("ping", reply=True, timeout=10, limit=len(running))
    assert sorted(replies, key=str) == sorted(({name: {"pong": name}} for name in running), key=str)


def test_destination_gets_the_only_reply(connect, nodes) -> None:
    mailbox, running = nodes
    target = sorted(running)[1]
    caller = mailbox(connect())
    assert caller._broadcast("ping", destination=[target], reply=True, timeout=10) == [{target: {"pong": target}}]
