"""`edge-coordinator run`: broker, chain, ingest worker, chain writer, metrics — one process.

Why this order: the broker and chain come first (managed children unless external URLs
are configured), then the journal and the contract (deployed once, remembered in the
journal), then the writer thread and the status server, and last the Celery worker in
the main thread. Shutdown runs the other way: the worker stops consuming and finishes
its current task (warm shutdown, acks_late keeps the rest in the broker), the writer
flushes what is pending, anvil is snapshotted, the children stop.

A SIGKILL skips all that; the next `run` adopts the surviving Mosquitto (it may hold
queued tasks), anvil restarts from its last snapshot and the writer reconciles the
journal against the chain, and redelivered tasks are journaled once (unique task id).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ledger.journal import anchor_backlog, recent_anchor_latencies

from .broker import managed_broker
from .config import CoordinatorConfig
from .errors import CoordinatorError
from .fleet_pki import FleetStore
from .http import StatusServer
from .metrics import Metrics, standard_metrics
from .registry import registry_column
from .supervisor import Child, port_open

log = logging.getLogger("edgeledger.coordinator")


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=3):
            return True
    except OSError:
        return False


class Coordinator:
    """Owns every moving part of the daemon; `start()`, `serve()`, `stop()`."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg
        self.store = FleetStore(cfg)
        self.metrics: Metrics = standard_metrics()
        self.broker: Child | None = None
        self.anvil: Any = None
        self.journal: Any = None
        self.writer: Any = None
        self.checkpointer: Any = None
        self._checkpoint_thread: threading.Thread | None = None
        self.status: StatusServer | None = None
        self.worker_ready = threading.Event()
        self._stop = threading.Event()
        self.stopping = threading.Event()  # shutdown began: do not restart children any more
        self._threads: list[threading.Thread] = []
        self._writer_thread: threading.Thread | None = None
        self.pid_file = cfg.run_dir / "coordinator.pid"

    # -- start ---------------------------------------------------------------------
    def start(self) -> None:
        if not self.store.exists():
            raise CoordinatorError(f"no fleet CA in {self.cfg.pki_dir}: run `edge-coordinator init --data-dir {self.cfg.data_dir}`")
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self._claim_pid_file()
        self._start_broker()
        self._start_chain()
        self._start_ledger()
        self._start_status()
        t = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        t.start()
        self._threads.append(t)

    def _claim_pid_file(self) -> None:
        try:
            other = int(self.pid_file.read_text().strip())
            if other != os.getpid():
                os.kill(other, 0)
                cmd = Path(f"/proc/{other}/cmdline").read_bytes()
                if b"coordinator" in cmd:
                    raise CoordinatorError(
                        f"a coordinator (pid {other}) already runs on {self.cfg.data_dir}: stop it first (kill {other})"
                    )
        except (OSError, ValueError):
            pass
        self.pid_file.write_text(str(os.getpid()))

    def _start_broker(self) -> None:
        if self.cfg.managed_broker:
            self.broker = managed_broker(self.cfg, self.store).start()
            log.info("mosquitto on %s (pid %s)", self.cfg.broker_url, self.broker.pid)
        elif not _reachable(self.cfg.broker.url, 8883):
            raise CoordinatorError(f"cannot reach the broker at {self.cfg.broker.url}: start it or fix broker.url")

    def _start_chain(self) -> None:
        if self.cfg.managed_chain:
            from ledger.anvil import AnvilError, ManagedAnvil

            if port_open(self.cfg.chain.port):
                raise CoordinatorError(
                    f"port 127.0.0.1:{self.cfg.chain.port} for the managed anvil is in use: stop what listens there or change chain.port"
                )
            try:
                self.anvil = ManagedAnvil(self.cfg.data_dir / "chain", port=self.cfg.chain.port, snapshot_interval=5.0).start()
            except AnvilError as exc:
                raise CoordinatorError(str(exc)) from None
            log.info("anvil on %s", self.anvil.rpc_url)
        elif not _reachable(self.cfg.chain.url, 8545):
            raise CoordinatorError(f"cannot reach the chain at {self.cfg.chain.url}: start it or fix chain.url")

    def _private_key(self) -> str:
        if self.cfg.chain.private_key:
            return self.cfg.chain.private_key
        if self.anvil is not None:
            return self.anvil.dev_key
        raise CoordinatorError("chain.private_key is empty: set the recorder account key for the external chain")

    def _start_ledger(self) -> None:
        from ledger.journal import Journal
        from ledger.writer import ChainWriter

        from .ingest import ensure_schema

        from ledger.checkpointer import Checkpointer

        from .tlog_setup import coordinator_log_key

        self.journal = Journal(self.cfg.journal_path)
        with self.journal.transaction() as db:
            ensure_schema(db)
        signer = coordinator_log_key(self.cfg)
        self.journal.set_config(log_origin=signer.name, log_vkey=signer.verifier().vkey)
        self.checkpointer = Checkpointer(self.journal, signer, interval=self.cfg.chain.checkpoint_interval,
                                         every=self.cfg.chain.checkpoint_every).attach()
        self._checkpoint_thread = threading.Thread(target=self.checkpointer.run, args=(self._stop,),
                                                   name="checkpointer", daemon=True)
        self._checkpoint_thread.start()
        log.info("transparency log %s", signer.name)
        try:
            self.writer = ChainWriter(
                self.journal, self.cfg.chain_url, self._private_key(),
                contract_address=self.cfg.chain.contract_address or None, max_batch=self.cfg.chain.batch_size,
            )
            address = self.writer.contract_address  # deploys once, or finds the remembered one
        except CoordinatorError:
            raise
        except Exception as exc:  # web3 raises many types; all mean the chain is not usable
            raise CoordinatorError(f"cannot use the chain at {self.cfg.chain_url}: {exc}") from None
        log.info("ledger contract %s", address)
        self._writer_thread = threading.Thread(
            target=self.writer.run, args=(self._stop, self.cfg.chain.batch_interval), name="chain-writer", daemon=True
        )
        self._writer_thread.start()

    def _start_status(self) -> None:
        from security import metrics as security_metrics

        m = self.metrics
        m.gauge_callback("edge_ledger_pending_rows", self._ledger_lag)
        m.gauge_callback("edge_anchor_latency_seconds", self._anchor_latency)
        m.gauge_callback("edge_agent_last_seen_timestamp", lambda: self._agent_gauge("last_seen"))
        m.gauge_callback("edge_agent_outbox_backlog", lambda: self._agent_gauge("outbox_backlog"))
        m.gauge_callback("edge_child_up", self._children_up)
        m.describe("edge_anchor_latency_seconds", "gauge", "Quantiles of journal append -> on-chain confirmation over the last 1000 records")
        m.extra_text(security_metrics.prometheus_text)
        from .tlog_http import TlogRoutes

        routes = TlogRoutes(self.cfg.journal_path, self.cfg.pki_dir / "log.pub")
        self.status = StatusServer(self.cfg.http.host, self.cfg.http.port, m, self.health, routes).start()
        log.info("metrics on http://%s:%d/metrics", self.cfg.http.host, self.status.port)

    # -- scrape-time gauges (own short-lived read connections: scrapes run in their own threads) --
    def _ledger_lag(self) -> list[tuple[dict[str, str], float]]:
        return [({"state": s}, float(n)) for s, n in anchor_backlog(self.cfg.journal_path).items()]

    def _anchor_latency(self) -> list[tuple[dict[str, str], float]]:
        values = sorted(recent_anchor_latencies(self.cfg.journal_path))
        if not values:
            return []
        return [({"quantile": str(q)}, values[min(len(values) - 1, int(q * len(values)))]) for q in (0.5, 0.9, 0.99)]

    def _agent_gauge(self, column: str) -> list[tuple[dict[str, str], float]]:
        return [({"agent": a}, v) for a, v in registry_column(self.cfg.journal_path, column)]

    def _children_up(self) -> list[tuple[dict[str, str], float]]:
        out = []
        if self.broker is not None:
            out.append(({"child": "mosquitto"}, 1.0 if self.broker.alive() else 0.0))
        if self.anvil is not None:
            out.append(({"child": "anvil"}, 1.0 if self.anvil.running else 0.0))
        return out

    def health(self) -> dict[str, bool]:
        broker_ok = self.broker.alive() and port_open(self.cfg.broker.port) if self.broker else _reachable(self.cfg.broker.url, 8883)
        chain_ok = self.anvil.running if self.anvil is not None else _reachable(self.cfg.chain.url, 8545)
        return {
            "broker": bool(broker_ok),
            "chain": bool(chain_ok),
            "writer": bool(self._writer_thread and self._writer_thread.is_alive()),
            "worker": self.worker_ready.is_set(),
        }

    # -- supervision ----------------------------------------------------------------
    def _supervise(self) -> None:
        """Restart a managed child that died (it should not; log why when it does)."""
        while not self._stop.wait(1.0):
            if self.stopping.is_set():
                continue
            if self.broker is not None and not self.broker.alive() and not self._stop.is_set():
                log.warning("mosquitto exited (%s); restarting", self.broker.log_tail(2))
                try:
                    self.broker.restart()
                except CoordinatorError as exc:
                    log.error("%s", exc)
            if self.anvil is not None and not self.anvil.running and not self._stop.is_set():
                log.warning("anvil exited; restarting from its last snapshot")
                try:
                    self.anvil.start()
                except Exception as exc:  # noqa: BLE001 - keep supervising; health reports it
                    log.error("anvil restart failed: %s", exc)

    def reload(self, *_: Any) -> None:
        """SIGHUP (sent by `revoke`): Mosquitto re-reads the CRL; the signature checks
        re-read it by itself (security.trust watches the file's mtime)."""
        log.warning("reloading: CRL %s", self.cfg.crl_path)
        if self.broker is not None:
            self.broker.signal(signal.SIGHUP)

    # -- worker ---------------------------------------------------------------------
    def serve(self, loglevel: str = "WARNING") -> None:
        """Run the Celery worker in this (main) thread until SIGTERM/SIGINT."""
        from celery import signals
        from celery.apps.worker import Worker as CeleryWorker

        from .celery_app import make_app, register_tasks
        from .ingest import Ingestor

        app = make_app(self.cfg, consumer=True)
        register_tasks(app, Ingestor(self.journal, self.metrics))
        coordinator = self

        class Worker(CeleryWorker):
            def install_platform_tweaks(self, worker: Any) -> None:
                super().install_platform_tweaks(worker)
                signal.signal(signal.SIGHUP, coordinator.reload)  # not Celery's restart-by-exec

        ready = self.worker_ready

        def on_ready(**_: Any) -> None:
            ready.set()

        def on_shutdown(**_: Any) -> None:
            coordinator.stopping.set()

        signals.worker_ready.connect(on_ready, weak=False)
        signals.worker_shutting_down.connect(on_shutdown, weak=False)
        worker = Worker(
            app=app, hostname=f"coordinator@{socket.gethostname()}", pool_cls="solo", concurrency=1,
            loglevel=loglevel, quiet=True, queues=[self.cfg.worker.queue],
            without_heartbeat=True, without_mingle=True, without_gossip=True, redirect_stdouts=False,
        )
        worker.start()
        self.worker_ready.clear()

    # -- stop -----------------------------------------------------------------------
    def stop(self, flush_timeout: float = 30.0) -> None:
        self.stopping.set()
        self._stop.set()
        if self._checkpoint_thread is not None:
            self._checkpoint_thread.join(timeout=30)
            try:
                self.checkpointer.checkpoint()  # cover what the worker journaled last
            except Exception as exc:  # noqa: BLE001 - the next run signs it
                log.warning("final checkpoint failed (the next run signs it): %s", exc)
        if self._writer_thread is not None:
            self._writer_thread.join(timeout=60)
            if self.anvil is not None and not self.anvil.running:
                # Ctrl-C reaches anvil too (same process group): bring it back to flush
                try:
                    self.anvil.start()
                except Exception as exc:  # noqa: BLE001 - rows stay pending for the next run
                    log.warning("anvil did not come back for the final flush: %s", exc)
            deadline = time.monotonic() + flush_timeout
            while time.monotonic() < deadline:  # flush: anchor what the worker journaled last
                try:
                    if not self.writer.anchor_pending():
                        break
                except Exception as exc:  # noqa: BLE001 - shutdown goes on; rows stay pending
                    log.warning("final anchoring failed (rows stay pending for the next run): %s", exc)
                    break
        if self.status is not None:
            self.status.stop()
        if self.anvil is not None:
            self.anvil.stop(snapshot=True)
        if self.broker is not None:
            self.broker.stop()
        if self.journal is not None:
            self.journal.close()
        try:
            if self.pid_file.read_text().strip() == str(os.getpid()):
                self.pid_file.unlink()
        except OSError:
            pass


def run_daemon(cfg: CoordinatorConfig, loglevel: str | None = None) -> int:
    level = (loglevel or cfg.log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message="You're running the worker with superuser privileges")
    coordinator = Coordinator(cfg)

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    # Until the worker installs its handlers, SIGTERM must still stop cleanly.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, coordinator.reload)
    try:
        coordinator.start()
        print(f"edge-coordinator: running (broker {cfg.broker_url}, chain {cfg.chain_url}, "
              f"metrics http://{cfg.http.host}:{coordinator.status.port if coordinator.status else cfg.http.port}/metrics)",
              flush=True)
        coordinator.serve(loglevel="WARNING" if level == "INFO" else level)
    except KeyboardInterrupt:
        pass
    finally:
        # the flush is bounded (writer join + 30 s); a second Ctrl-C must not cut it half-way
        # (a Python no-op handler, not SIG_IGN: children started now must not inherit "ignore")
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, lambda *_: None)
        coordinator.stop()
    print("edge-coordinator: stopped", flush=True)
    return 0
