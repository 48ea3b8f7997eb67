"""A real `celery worker` subprocess over kombu_mqtt, for tests and bench/transport.py.

Why a subprocess: crash redelivery, idle wakeups and the stock CLI are only
meaningful for a real worker process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CELERY = str(Path(sys.executable).with_name("celery"))


def worker_env(broker_url: str, ssl_options: dict | None, queue: str, client_id: str | None = None) -> dict[str, str]:
    """Environment for tests.transport.celery_app (see its docstring)."""
    env = dict(os.environ, KMQ_BROKER_URL=broker_url, KMQ_QUEUE=queue, PYTHONPATH=str(ROOT))
    for key in ("KMQ_CA", "KMQ_CERT", "KMQ_KEY", "KMQ_CLIENT_ID"):
        env.pop(key, None)
    if ssl_options:
        env.update(KMQ_CA=ssl_options["ca_certs"], KMQ_CERT=ssl_options["certfile"], KMQ_KEY=ssl_options["keyfile"])
    if client_id:
        env["KMQ_CLIENT_ID"] = client_id
    return env


@dataclass
class WorkerProcess:
    """`celery -A <app> worker -P solo -c 1` with its own process group and log file."""

    env: dict[str, str]
    log_path: Path
    app: str = "tests.transport.celery_app"
    extra_args: tuple[str, ...] = ("--without-heartbeat", "--without-gossip", "--without-mingle")
    process: subprocess.Popen | None = None
    _log_offset: int = field(default=0)

    def start(self) -> WorkerProcess:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [CELERY, "-A", self.app, "worker", "-P", "solo", "-c", "1", "--prefetch-multiplier", "1", "-l", "info", *self.extra_args],
            env=self.env,
            cwd=str(ROOT),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_bytes()[self._log_offset :].decode(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode} before logging {text!r}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker did not log {text!r} within {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 60.0) -> WorkerProcess:
        self.wait_for_log(" ready.", timeout)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash: no ack, no goodbye)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass

    def context_switches(self) -> int:
        """Voluntary context switches summed over the worker's threads (how often it slept and woke)."""
        total = 0
        for status in Path(f"/proc/{self.pid}/task").glob("*/status"):
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
            except FileNotFoundError:
                continue
        return total
