"""A real `celery worker` subprocess over kombu_mqtt, for tests and bench/transport.py.

Why a subprocess: crash redelivery, idle wakeups and the stock CLI are only
meaningful for a real worker process.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from ledger.processes import ChildProcess

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


class WorkerProcess(ChildProcess):
    """`celery -A <app> worker -P solo -c 1` (a ledger.processes.ChildProcess: own process group, log file)."""

    def __init__(self, env: dict[str, str], log_path: Path, app: str = "tests.transport.celery_app",
                 extra_args: tuple[str, ...] = ("--without-heartbeat", "--without-gossip", "--without-mingle")) -> None:
        argv = [CELERY, "-A", app, "worker", "-P", "solo", "-c", "1", "--prefetch-multiplier", "1", "-l", "info", *extra_args]
        super().__init__(f"celery worker ({app})", argv, log_path, env=env, cwd=ROOT)

    def start(self) -> WorkerProcess:
        super().start()
        return self

    def wait_ready(self, timeout: float = 60.0) -> WorkerProcess:
        self.wait_for_log(" ready.", timeout)
        return self

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it hangs."""
        super().stop(timeout, sig)
