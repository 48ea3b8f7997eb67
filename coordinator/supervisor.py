"""Child processes the daemon owns (Mosquitto; anvil when ledger does not manage it).

Why: `run` must bring up what is not configured externally, notice when a child dies,
restart it, and stop everything on SIGTERM. Each child runs in its own session so a
Ctrl-C to the terminal reaches the coordinator first and the coordinator decides the
order of shutdown (stop consuming, flush, then stop the broker).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ledger.anvil import free_port  # noqa: F401  (re-exported for the demo)

from .errors import CoordinatorError


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port, host):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.03)
    return False


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


@dataclass
class Child:
    """One supervised process: started in its own session, logged to a file."""

    name: str
    argv: list[str]
    log_path: Path
    port: int | None = None
    start_timeout: float = 20.0
    env: dict[str, str] | None = None
    pid_file: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    adopted_pid: int | None = None
    restarts: int = 0

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
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            try:
                self.process = subprocess.Popen(
                    self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, env=self.env,
                )
            except FileNotFoundError:
                raise CoordinatorError(f"{self.name}: {self.argv[0]} not found: run `make setup`") from None
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
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        if self.adopted_pid is not None:
            return self.adopted_pid
        return self.process.pid if self.process else None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.pid is not None
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.adopted_pid is not None:
            pid, self.adopted_pid = self.adopted_pid, None
            self._stop_adopted(pid, timeout)
            return
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def _stop_adopted(self, pid: int, timeout: float) -> None:
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

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return " | ".join(text[-lines:])
