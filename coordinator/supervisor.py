"""Child processes the daemon owns (Mosquitto; anvil when ledger does not manage it).

Why: `run` must bring up what is not configured externally, notice when a child dies,
restart it, and stop everything on SIGTERM. Each child runs in its own session so a
Ctrl-C to the terminal reaches the coordinator first and the coordinator decides the
order of shutdown (stop consuming, flush, then stop the broker).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ledger.processes import ChildProcess, ProcessStartError, free_port, port_open, wait_for_port

from .errors import CoordinatorError

__all__ = ["Child", "free_port", "port_open", "wait_for_port"]  # free_port: re-exported for the demo


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (reaping it if it is our child)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Child(ChildProcess):
    """One supervised process (ledger.processes.ChildProcess) that can adopt a survivor.

    What the daemon adds to the common mechanism: a pid file, so a child left running by
    a coordinator that was SIGKILLed is adopted instead of started twice; a port check
    before starting; restarts counted; failures as CoordinatorError (cause + fix).
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, port: int | None = None, start_timeout: float = 20.0,
                 env: dict[str, str] | None = None, pid_file: Path | None = None) -> None:
        super().__init__(name, argv, log_path, env=env)
        self.port, self.start_timeout, self.pid_file = port, start_timeout, pid_file
        self.adopted_pid: int | None = None
        self.restarts = 0

    def _find_survivor(self) -> int | None:
        """A child left running by a coordinator that was killed (SIGKILL skips cleanup).

        Why adopt instead of restart: the broker may hold acknowledged-but-unconsumed
        tasks in memory; killing it would lose what was not yet autosaved.
        """
        if self.pid_file is None:
            return None
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        wanted = [a.encode() for a in self.argv]
        return pid if cmdline[: len(wanted)] == wanted else None

    def start(self) -> Child:
        survivor = self._find_survivor()
        if survivor is not None and (self.port is None or wait_for_port(self.port, self.start_timeout)):
            self.adopted_pid = survivor
            return self
        if self.port is not None and port_open(self.port):
            raise CoordinatorError(
                f"{self.name}: port 127.0.0.1:{self.port} is already in use: stop what listens there or change the port in coordinator.toml"
            )
        try:
            super().start()
        except ProcessStartError as exc:
            raise CoordinatorError(str(exc)) from None
        assert self.process is not None
        if self.pid_file is not None:
            self.pid_file.write_text(str(self.process.pid))
        if self.port is not None and not wait_for_port(self.port, self.start_timeout, self.process):
            tail = self.log_tail()
            self.stop()
            raise CoordinatorError(f"{self.name} did not start on port {self.port}: {tail or 'no log output'}")
        return self

    def alive(self) -> bool:
        if self.adopted_pid is not None:
            return _running(self.adopted_pid) and self._find_survivor() == self.adopted_pid
        return super().alive()

    @property
    def pid(self) -> int | None:
        if self.adopted_pid is not None:
            return self.adopted_pid
        return super().pid

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        if self.adopted_pid is not None:
            pid, self.adopted_pid = self.adopted_pid, None
            self._stop_adopted(pid, timeout)
            return
        super().stop(timeout, sig)

    def _stop_adopted(self, pid: int, timeout: float) -> None:
        """Not our child (no Popen to wait on): signal, poll until gone, then SIGKILL."""
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _running(pid):
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def signal(self, sig: int) -> None:  # defined after stop(): its default reads the signal module
        """Send `sig` to the child (or the adopted survivor) itself."""
        if self.alive():
            assert self.pid is not None
            os.kill(self.pid, sig)

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()
