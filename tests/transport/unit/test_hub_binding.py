"""HubBinding on a real kombu Hub with stand-in sessions: write watches across reconnects."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from kombu.asynchronous import Hub

from kombu_mqtt.hub import HubBinding


class StandInSession:
    """The MqttSession surface HubBinding uses; `sock` is replaced on "reconnect"."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair()
        self.generation = 1
        self.pending_write = True
        self.flushes = 0
        self.old_peer: socket.socket | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def want_write(self) -> bool:
        return self.pending_write

    def flush(self) -> None:
        self.flushes += 1
        self.pending_write = False

    def buffered(self) -> bool:
        return False

    def reconnect(self) -> None:
        """A new socket that gets the old one's fd number, as the kernel hands out the lowest free fd."""
        number = self.sock.fileno()
        self.sock.close()
        self.old_peer = self.peer  # sees EOF once no fd refers to the old socket any more
        new, self.peer = socket.socketpair()
        if new.fileno() != number:
            os.dup2(new.fileno(), number)
            new.close()
            new = socket.socket(fileno=number)
        self.sock = new
        self.generation += 1
        self.pending_write = True


class StandInTransport:
    def __init__(self, session: StandInSession) -> None:
        self.session = session

    tick_interval = 60.0

    def sessions(self) -> list[Any]:
        return [self.session]

    def has_work(self) -> bool:
        return False

    def run_ready(self) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[Hub]:
    loop = Hub()
    yield loop
    loop.close()


def test_a_write_watch_follows_the_socket_a_reconnect_put_in_place(hub: Hub) -> None:
    session = StandInSession()
    binding = HubBinding(StandInTransport(session), hub)
    binding.watch_write(session)  # type: ignore[arg-type]
    session.reconnect()  # same fd number, new connection; the old watch never fired
    binding.watch_write(session)  # type: ignore[arg-type]
    dup, generation = binding.write_watches[id(session)]
    assert generation == 2
    assert os.fstat(dup).st_ino == os.fstat(session.fileno()).st_ino  # watches the new socket
    session.old_peer.setblocking(False)
    assert session.old_peer.recv(1) == b""  # the stale dup is closed: the dead connection is gone
    hub.run_once()
    assert session.flushes == 1 and id(session) not in binding.write_watches
    binding.unregister()
    for sock in (session.sock, session.peer, session.old_peer):
        sock.close()
