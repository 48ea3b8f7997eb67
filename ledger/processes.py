"""Starting, watching and stopping child processes: the project's one mechanism.

Why one: the coordinator supervises Mosquitto and anvil, the ledger runs its managed
anvil, and the tests and benchmarks start brokers, workers and agents. Each used to
spawn, wait and kill in its own way (process group or not, SIGKILL after how long, what
a start failure says). Here every child runs in its own session (so a Ctrl-C to the
terminal reaches the parent first and the parent decides the order of shutdown), is
stopped as a whole process group (SIGTERM, then SIGKILL after a timeout), logs to a file,
and a start that fails says why with the tail of that log.

Why in `ledger`: it is the lowest package that starts a child (the managed anvil), and
the coordinator, the tests and the benchmarks sit above it. Standard library only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path


class ProcessStartError(RuntimeError):
    """A child process could not be started or did not become ready."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, host: str = "127.0.0.1") -> bool:
    """Wait until host:port accepts connections; False on timeout or when `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port, host):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.03)
    return False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal `proc`'s process group and reap it; SIGKILL the group after `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        proc.wait()
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def stop_all(children: Iterable[ChildProcess | None], sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Stop several children in parallel: signal every group first, then reap each (SIGKILL after `timeout`).

    Why: stopping one after the other costs the sum of their shutdown times."""
    running = [c for c in children if c is not None and c.alive()]
    for child in running:
        assert child.process is not None
        try:
            os.killpg(child.process.pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for child in running:
        assert child.process is not None
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_group(child.process, signal.SIGKILL)


class ChildProcess:
    """One child in its own session, its output appended to `log_path`.

    `start()`, then wait for readiness with `wait_for_port` or `wait_for_log`; `stop()`
    (SIGTERM to the group, SIGKILL after a timeout) or `kill()` (a crash: SIGKILL).
    die_with_parent: the child gets PDEATHSIG=SIGKILL (Linux), so it dies with the thread
    that started it; start it from a long-lived thread. preexec: run in the child before
    exec (e.g. joining a cgroup).
    """

    def __init__(self, name: str, argv: list[str], log_path: Path | None = None, *, env: dict[str, str] | None = None,
                 cwd: Path | str | None = None, die_with_parent: bool = False, preexec: Callable[[], None] | None = None,
                 fix: str = "run `make setup`") -> None:
        self.name, self.argv, self.log_path = name, list(argv), log_path
        self.env, self.cwd, self.die_with_parent, self.preexec, self.fix = env, cwd, die_with_parent, preexec, fix
        self.process: subprocess.Popen | None = None
        self._log_offset = 0

    def start(self) -> ChildProcess:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        out = open(self.log_path, "ab") if self.log_path is not None else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
                start_new_session=True, preexec_fn=self._preexec if (self.die_with_parent or self.preexec) else None,
            )
        except FileNotFoundError:
            raise ProcessStartError(f"{self.name}: {self.argv[0]} not found: {self.fix}") from None
        finally:
            if not isinstance(out, int):
                out.close()
        return self

    def _preexec(self) -> None:  # in the child, between fork and exec
        if self.die_with_parent:
            _die_with_parent()
        if self.preexec is not None:
            self.preexec()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def context_switches(self) -> int:
        """Voluntary context switches summed over the child's threads (how often it slept
        and woke: the idle-wakeup measure of tests and benches); 0 once it is gone."""
        total = 0
        for status in Path(f"/proc/{self.pid}/task").glob("*/status"):
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
            except FileNotFoundError:
                continue
        return total

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the child itself (not its group), if it runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Stop the whole process group (`sig`, then SIGKILL after `timeout` s) and reap it (`pid` stays readable)."""
        stop_group(self.process, sig, timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash: no cleanup, no goodbye)."""
        self.stop(sig=signal.SIGKILL)

    def log(self) -> str:
        """What the child wrote since this start."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[self._log_offset:].decode(errors="replace")

    def log_tail(self, lines: int = 3) -> str:
        return " | ".join(self.log().strip().splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str, poll: float = 0.03) -> ChildProcess:
        """Wait for `ready()`, checking every `poll` s; ProcessStartError with the log's tail if the
        child exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ProcessStartError(f"{self.name} exited ({code}) before {what}: {self.log_tail(10) or 'no output'}")
            if time.monotonic() > deadline:
                raise ProcessStartError(f"{self.name}: no {what} within {timeout:g}s: {self.log_tail(10) or 'no output'}")
            time.sleep(poll)
        return self

    def wait_for_port(self, port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> ChildProcess:
        return self.wait_until(lambda: port_open(port, host), timeout, f"listener on {host}:{port}")

    def wait_for_log(self, text: str, timeout: float = 60.0, poll: float = 0.03) -> ChildProcess:
        return self.wait_until(lambda: text in self.log(), timeout, f"{text!r} in its log", poll)
