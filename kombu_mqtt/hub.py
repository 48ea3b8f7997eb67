"""kombu Hub integration for the MQTT transport (the event-driven path of a Celery worker).

Why a module of its own: the Hub has pitfalls (see DESIGN.md) that shape this code
and are easy to break: WRITE interest on an fd already registered for READ is
silently dropped (so paho writes directly and a dup()ed fd carries write interest
when a write would block); `call_soon` items added while the Hub runs do not
shorten its poll (so deliveries only happen from reader callbacks, woken through a
pipe); an idle Hub sleeps up to 10 s (so signals get a wakeup fd). Mixed into
`kombu_mqtt.transport.Transport`, whose attributes it uses.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from .client import MqttSession
from .errors import MqttConnectionError


class HubIntegration:
    """register_with_event_loop / on_readable and the wakeup plumbing around them."""

    def _schedule_delivery(self) -> None:
        """Make the Hub deliver buffered messages soon (no-op without a Hub: drain_events loops).

        Why a pipe: kombu's Hub runs `call_soon` items only at the top of an
        iteration and does not shorten its poll for them, and Celery acks through
        `call_soon`. Delivering from a timer or `on_tick` would let those acks wait
        for the next poll (up to 10 s) while prefetch is full. So deliveries only
        happen from reader callbacks: this writes one byte to a pipe the Hub watches.
        """
        if self._hub is None or self._kick_fds is None or self._kicked:
            return
        if self._buffers or self._pending_durable or self._refused:
            self._kicked = True
            try:
                os.write(self._kick_fds[1], b"\0")
            except BlockingIOError:
                pass

    def _on_kick(self) -> None:
        try:
            while os.read(self._kick_fds[0], 512):
                pass
        except (BlockingIOError, TypeError):
            pass
        self._kicked = False
        self._apply_pending()
        self._deliver_ready()

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self._hub = loop
        self._sync_readers()
        if self._tick is None:
            self._tick = loop.call_repeatedly(max(1.0, self.options.keepalive / 3), self._on_tick)
        if self._kick_fds is None:
            self._kick_fds = os.pipe()
            for fd in self._kick_fds:
                os.set_blocking(fd, False)
            loop.add_reader(self._kick_fds[0], self._on_kick)
        self._install_signal_wakeup(loop)
        self._schedule_delivery()

    def _install_signal_wakeup(self, loop: Any) -> None:
        """Let signals (SIGTERM, SIGINT) wake the idle Hub at once.

        Why: Python retries an interrupted poll, so an event-driven worker with no
        timer due would notice a warm-shutdown request only when its poll times out
        (up to 10 s). Only installed when nobody else set a wakeup fd.
        """
        if self._signal_pipe is not None:
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
        self._signal_pipe = (read_fd, write_fd)

        def drain() -> None:
            try:
                while os.read(read_fd, 512):
                    pass
            except BlockingIOError:
                pass

        loop.add_reader(read_fd, drain)

    def _remove_signal_wakeup(self, loop: Any) -> None:
        if self._signal_pipe is None:
            return
        read_fd, write_fd = self._signal_pipe
        self._signal_pipe = None
        loop.remove_reader(read_fd)
        try:
            current = signal.set_wakeup_fd(-1)
            if current not in (-1, write_fd):
                signal.set_wakeup_fd(current)  # someone else's since: leave it in place
        except ValueError:
            pass
        os.close(read_fd)
        os.close(write_fd)

    def unregister_from_event_loop(self, connection: Any, loop: Any) -> None:
        for fd in list(self._registered):
            loop.remove_reader(fd)
        self._registered.clear()
        for fd, dup in list(self._write_fds.items()):
            loop.remove_writer(dup)
            os.close(dup)
        self._write_fds.clear()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._kick_fds is not None:
            loop.remove_reader(self._kick_fds[0])
            for fd in self._kick_fds:
                os.close(fd)
            self._kick_fds = None
            self._kicked = False
        self._remove_signal_wakeup(loop)
        self._hub = None

    def _sync_readers(self) -> None:
        """Register each session's current socket; a reconnect may reuse the fd number."""
        hub = self._hub
        wanted: dict[int, tuple[MqttSession, int]] = {}
        for session in self._sessions():
            fd = session.fileno()
            if fd is not None:
                wanted[fd] = (session, session.generation)
        for fd, entry in list(self._registered.items()):
            if wanted.get(fd) != entry:
                hub.remove_reader(fd)
                del self._registered[fd]
        for fd, entry in wanted.items():
            if fd not in self._registered:
                hub.add_reader(fd, self.on_readable, entry[0])
                self._registered[fd] = entry

    def on_readable(self, session: MqttSession) -> None:
        """Hub callback: read everything, deliver what prefetch allows."""
        self._in_io = True
        try:
            session.read_available()
        except MqttConnectionError:
            self._drop_readers()
            raise
        finally:
            self._in_io = False
        self._after_io()

    def _after_io(self) -> None:
        for session in self._sessions():
            if session.want_write():
                self._watch_write(session)
        self._apply_pending()
        self._deliver_ready()

    def _watch_write(self, session: MqttSession) -> None:
        """A write would block: wait for writability on a dup()ed fd (see DESIGN.md Hub pitfalls)."""
        fd = session.fileno()
        if fd is None or fd in self._write_fds or self._hub is None:
            return
        dup = os.dup(fd)
        self._write_fds[fd] = dup

        def on_writable() -> None:
            try:
                session.flush()
            finally:
                if not session.want_write():
                    self._hub.remove_writer(dup)
                    os.close(dup)
                    self._write_fds.pop(fd, None)

        self._hub.add_writer(dup, on_writable)

    def _drop_readers(self) -> None:
        if self._hub is not None:
            for fd in list(self._registered):
                self._hub.remove_reader(fd)
            self._registered.clear()

    def _on_tick(self) -> None:
        """Keepalive timer: pings only; deliveries go through the kick pipe."""
        for session in self._sessions():
            try:
                session.misc()
            except MqttConnectionError:
                self._drop_readers()
                raise
            if session.want_write():
                self._watch_write(session)
        self._schedule_delivery()
