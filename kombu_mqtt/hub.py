"""kombu Hub integration for the MQTT transport (the event-driven path of a Celery worker).

Why a module of its own: the Hub has pitfalls that shape this code and are easy to
break: WRITE interest on an fd already registered for READ is silently dropped
(epoll EEXIST), and `remove_writer(sock)` can drop the reader; so paho writes
directly and a dup()ed fd carries write interest when a write would block. Items
that the Hub's own thread adds with `call_soon` while it runs callbacks wait for
the next poll, so deliveries only happen from reader callbacks, woken through a
pipe. An idle Hub sleeps up to 10 s, so signals get a wakeup fd.

:class:`HubBinding` is owned by one transport (like kombu's MultiChannelPoller) and
holds all per-loop state: readers, write watches, the kick pipe, the keepalive tick.
The transport is seen only through the small :class:`LoopClient` protocol.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Protocol

from .client import MqttSession
from .errors import MqttConnectionError


class LoopClient(Protocol):
    """What the binding needs from its transport."""

    @property
    def tick_interval(self) -> float:
        """Seconds between keepalive ticks."""

    def sessions(self) -> list[MqttSession]:
        """The MQTT sessions whose sockets the Hub must watch."""

    def has_work(self) -> bool:
        """Messages or subscriptions wait to be handled."""

    def run_ready(self) -> None:
        """Subscribe what waits to be subscribed and hand out what prefetch allows."""


class HubBinding:
    """One transport's readers, write watches, kick pipe and tick on one kombu Hub."""

    def __init__(self, client: LoopClient, loop: Any) -> None:
        self.client = client
        self.loop = loop
        self.readers: dict[int, tuple[MqttSession, int]] = {}  # fd -> (session, socket generation)
        self.write_watches: dict[int, tuple[int, int]] = {}  # id(session) -> (dup fd, socket generation)
        self.kick_fds: tuple[int, int] | None = None
        self.kicked = False
        self.reading = False
        self.tick: Any = None
        self.signal_pipe: tuple[int, int] | None = None

    # -- lifecycle ----------------------------------------------------------------
    def register(self) -> None:
        self.sync_readers()
        if self.tick is None:
            self.tick = self.loop.call_repeatedly(self.client.tick_interval, self.on_tick)
        if self.kick_fds is None:
            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)
            self.kick_fds = (read_fd, write_fd)
            self.loop.add_reader(read_fd, self.on_kick)
        self._install_signal_wakeup()
        self.kick()

    def unregister(self) -> None:
        for fd in list(self.readers):
            self.loop.remove_reader(fd)
        self.readers.clear()
        for dup, _generation in list(self.write_watches.values()):
            self.loop.remove_writer(dup)
            os.close(dup)
        self.write_watches.clear()
        if self.tick is not None:
            self.tick.cancel()
            self.tick = None
        if self.kick_fds is not None:
            self.loop.remove_reader(self.kick_fds[0])
            for fd in self.kick_fds:
                os.close(fd)
            self.kick_fds = None
            self.kicked = False
        self._remove_signal_wakeup()

    # -- waking the loop ------------------------------------------------------------
    def kick(self) -> None:
        """Make the Hub run `client.run_ready` (and read TLS-buffered packets) soon.

        Why a pipe: kombu's Hub runs `call_soon` items only at the top of an
        iteration, and Celery acks through `call_soon`. Delivering from a timer or
        `on_tick` would let those acks wait for the next poll (up to 10 s) while
        prefetch is full. So deliveries only happen from reader callbacks: this
        writes one byte to a pipe the Hub watches. While a reader callback runs,
        nothing is written: it hands out messages itself when it has read.
        """
        if self.reading or self.kicked or self.kick_fds is None:
            return
        if self.client.has_work() or any(session.buffered() for session in self.client.sessions()):
            self.kicked = True
            try:
                os.write(self.kick_fds[1], b"\0")
            except BlockingIOError:
                pass

    def on_kick(self) -> None:
        if self.kick_fds is not None:
            try:
                while os.read(self.kick_fds[0], 512):
                    pass
            except BlockingIOError:
                pass
        self.kicked = False
        for session in self.client.sessions():
            if session.buffered():
                self.on_readable(session)
        self.client.run_ready()

    # -- reading and writing -----------------------------------------------------------
    def sync_readers(self) -> None:
        """Register each session's current socket; a reconnect may reuse the fd number."""
        wanted: dict[int, tuple[MqttSession, int]] = {}
        for session in self.client.sessions():
            fd = session.fileno()
            if fd is not None:
                wanted[fd] = (session, session.generation)
        for fd, entry in list(self.readers.items()):
            if wanted.get(fd) != entry:
                self.loop.remove_reader(fd)
                del self.readers[fd]
        for fd, entry in wanted.items():
            if fd not in self.readers:
                self.loop.add_reader(fd, self.on_readable, entry[0])
                self.readers[fd] = entry

    def on_readable(self, session: MqttSession) -> None:
        """Hub callback: read (a bounded amount), then hand out what prefetch allows."""
        self.reading = True
        try:
            session.read_available()
        except MqttConnectionError:
            self.drop_readers()
            raise
        finally:
            self.reading = False
        self.after_io()

    def after_io(self) -> None:
        for session in self.client.sessions():
            if session.want_write():
                self.watch_write(session)
        self.client.run_ready()
        # Root cause of the "stall until the next keepalive tick" after a reconnect with
        # a backlog: when the read budget ran out, the rest of a TLS record waited
        # decrypted in the SSL object, which epoll cannot see, until unrelated bytes
        # (the PINGRESP) arrived. Come back for such packets through the kick pipe.
        if any(session.buffered() for session in self.client.sessions()):
            self.kick()

    def watch_write(self, session: MqttSession) -> None:
        """A write would block: wait for writability on a dup()ed fd (see the module docstring)."""
        fd = session.fileno()
        if fd is None:
            return
        key = id(session)
        watch = self.write_watches.get(key)
        if watch is not None:
            if watch[1] == session.generation:
                return
            # A watch left from a socket that a reconnect replaced: its dup would keep
            # the dead connection open and keep the new socket's writes unwatched.
            self._stop_watch(key)
        dup = os.dup(fd)
        self.write_watches[key] = (dup, session.generation)

        def on_writable() -> None:
            try:
                session.flush()
            finally:
                current = self.write_watches.get(key)
                if current is not None and current[0] == dup and (not session.want_write() or current[1] != session.generation):
                    self._stop_watch(key)

        self.loop.add_writer(dup, on_writable)

    def _stop_watch(self, key: int) -> None:
        dup, _generation = self.write_watches.pop(key)
        self.loop.remove_writer(dup)
        os.close(dup)

    def drop_readers(self) -> None:
        for fd in list(self.readers):
            self.loop.remove_reader(fd)
        self.readers.clear()

    def on_tick(self) -> None:
        """Keepalive timer: pings only; deliveries go through the kick pipe."""
        for session in self.client.sessions():
            try:
                session.misc()
            except MqttConnectionError:
                self.drop_readers()
                raise
            if session.want_write():
                self.watch_write(session)
        self.kick()

    # -- signals -------------------------------------------------------------------------
    def _install_signal_wakeup(self) -> None:
        """Let signals (SIGTERM, SIGINT) wake the idle Hub at once.

        Why: Python retries an interrupted poll, so an event-driven worker with no
        timer due would notice a warm-shutdown request only when its poll times out
        (up to 10 s). Only installed when nobody else set a wakeup fd.
        """
        if self.signal_pipe is not None:
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        try:
            previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            os.close(read_fd)
            os.close(write_fd)
            return
        if previous != -1:
            signal.set_wakeup_fd(previous)
            os.close(read_fd)
            os.close(write_fd)
            return
        self.signal_pipe = (read_fd, write_fd)

        def drain() -> None:
            try:
                while os.read(read_fd, 512):
                    pass
            except BlockingIOError:
                pass

        self.loop.add_reader(read_fd, drain)

    def _remove_signal_wakeup(self) -> None:
        if self.signal_pipe is None:
            return
        read_fd, write_fd = self.signal_pipe
        self.signal_pipe = None
        self.loop.remove_reader(read_fd)
        try:
            current = signal.set_wakeup_fd(-1)
            if current not in (-1, write_fd):
                signal.set_wakeup_fd(current)  # someone else's since: leave it in place
        except ValueError:
            pass
        os.close(read_fd)
        os.close(write_fd)
