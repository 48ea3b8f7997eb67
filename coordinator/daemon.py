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

from .broker import managed_broker
from .config import CoordinatorConfig
from .errors import CoordinatorError
from .fleet_pki import FleetStore
from .http import StatusServer
from .metrics import Metrics, standard_metrics
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
        self.metrics_since = time.time()  # anchor latencies count from here (the writer starts before /metrics)
        self.broker: Child | None = None
        self.anvil: Any = None
        self.journal: Any = None
        self.writer: Any = None
        self.checkpointer: Any = None
        self._checkpoint_thread: threading.Thread | None = None
        self.status: StatusServer | None = None
        self.health_checks: dict[str, Any] = {}
        # hooks for other parts: more HTTP routes ({path: handler}, see coordinator/http.py) and
        # the latest checkpoint/audit state for the fleet page (the journal's, by default)
        self.extra_routes: dict[str, Any] = {}
        self.checkpoint_provider: Any = self._checkpoint_state
        self.worker_ready = threading.Event()
        self._stop = threading.Event()
        self.stopping = threading.Event()  # shutdown began: do not restart children any more
        self._threads: list[threading.Thread] = []
        self._writer_thread: threading.Thread | None = None
        self.pid_file = cfg.run_dir / "coordinator.pid"

    # -- start ---------------------------------------------------------------------
    def start(self) -> None:
        if self.cfg.holds_ca and not self.store.exists():
            raise CoordinatorError(f"no fleet CA in {self.cfg.pki_dir}: run `edge-coordinator init --data-dir {self.cfg.data_dir}`")
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self._claim_pid_file()
        self._warn_unsafe_acl()
        if self.cfg.holds_ca and self.store.crl_due():  # Mosquitto and the agents refuse a CRL past its next-update
            self.store.reissue_crl()
            log.info("CRL %s re-issued (valid %gs)", self.cfg.crl_path, self.cfg.pki.crl_validity)
        self._start_broker()
        self._start_chain()
        self._start_ledger()
        self._start_status()
        t = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        t.start()
        self._threads.append(t)
        if self.cfg.holds_ca:  # a peer holds no CA key: the first coordinator re-issues and pushes the CRL
            t = threading.Thread(target=self._keep_crl_fresh, name="crl-keeper", daemon=True)
            t.start()
            self._threads.append(t)
        else:
            log.info("peer coordinator %s (no CA key): the CRL is re-issued and pushed by the first coordinator; "
                     "copy its pki/crl.pem here after a revocation", self.cfg.identity)

    def _warn_unsafe_acl(self) -> None:
        if self.cfg.broker.acl_mode == "file":
            log.warning(
                "broker.acl_mode = \"file\" is UNSAFE for a fleet: Mosquitto's acl_file never checks SUBSCRIBE, so any "
                "agent can join the ingest group and drop other agents' readings, and a revoked agent keeps its live "
                "connection; set broker.acl_mode = \"dynsec\" in %s", self.cfg.config_path,
            )

    # -- CRL: re-issue before it goes stale, push to agents -----------------------
    def _keep_crl_fresh(self) -> None:
        """Push the CRL once at start (agents that were away catch up), then re-issue and
        push it whenever it is older than pki.crl_refresh."""
        from .crl_push import push_crl

        check_every = max(1.0, min(60.0, self.cfg.pki.crl_refresh / 4))
        # The pusher's signing app opens the same replay/quarantine files: let the worker
        # create them first (two first opens in one process race on SQLite's WAL switch).
        while not self.worker_ready.wait(1.0):
            if self._stop.is_set():
                return
        first = True
        while not self._stop.wait(0.0 if first else check_every):
            try:
                due = self.store.crl_due()
                if due:
                    self.store.reissue_crl()
                    log.info("CRL %s re-issued (valid %gs)", self.cfg.crl_path, self.cfg.pki.crl_validity)
                    if self.broker is not None:
                        self.broker.signal(signal.SIGHUP)
                if due or first:
                    push_crl(self.cfg, self.store.active_agents())
                first = False
            except Exception as exc:  # noqa: BLE001 - keep trying; agents fail closed meanwhile
                log.error("CRL refresh/push failed (retrying in %.0fs): %s", check_every, exc)
                first = False

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
                self.anvil = ManagedAnvil(self.cfg.data_dir / "chain", port=self.cfg.chain.port, snapshot_interval=self.cfg.chain.snapshot_interval).start()
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
        from ledger.checkpointer import Checkpointer
        from ledger.journal import Journal
        from ledger.writer import ChainWriter

        from .ingest import ensure_schema
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
        except Exception as exc:  # noqa: BLE001 - web3 raises many types; all mean the chain is not usable
            raise CoordinatorError(f"cannot use the chain at {self.cfg.chain_url}: {exc}") from None
        log.info("ledger contract %s", address)
        self.checkpointer.on_new = self.writer.wake.set  # anchor a new checkpoint now, not at the next round
        self._writer_thread = threading.Thread(
            target=self.writer.run, args=(self._stop, self.cfg.chain.batch_interval), name="chain-writer", daemon=True
        )
        self._writer_thread.start()

    def _start_status(self) -> None:
        """/metrics, /healthz and the fleet page on http.host:http.port (the metrics/health wiring)."""
        from ledger.journal import oldest_unanchored

        from . import fleet_page, fleet_view
        from . import health as checks
        from .http import Response
        from .metrics import AnchorLatencyFeed, agent_families, child_families, ledger_families
        from .registry import list_agents
        from .tlog_http import TlogRoutes

        cfg, m = self.cfg, self.metrics
        m.before_scrape(AnchorLatencyFeed(cfg.journal_path, m.anchor_latency, now=self.metrics_since))
        m.add_families("ledger", lambda: ledger_families(cfg.journal_path))
        m.add_families("agents", lambda: agent_families(list_agents(self.store, cfg.journal_path),
                                                        fleet_view.latest_issued(self.store)))
        m.add_families("children", lambda: child_families(self._children()))
        self.health_checks = {
            "broker": checks.broker_check(cfg.broker_url, self.broker.alive if self.broker is not None else None),
            "chain": checks.chain_check(cfg.chain_url, (lambda: bool(self.anvil.running)) if self.anvil is not None else None),
            "journal": checks.journal_check(cfg.journal_path, cfg.monitor.journal_probe_timeout),
            "anchoring": checks.anchoring_check(cfg.journal_path, cfg.monitor.anchor_lag_max, oldest_unanchored),
            "writer": checks.thread_check("chain writer", lambda: bool(self._writer_thread and self._writer_thread.is_alive()),
                                          "the chain writer thread died: see the coordinator log and restart the coordinator"),
            "worker": checks.thread_check("ingest worker", self.worker_ready.is_set,
                                          "the ingest worker is starting or stopped: wait, or see the coordinator log"),
        }

        def fleet(_req: object) -> Response:
            snap = fleet_view.gather(cfg, self.store, health=checks.run_checks(self.health_checks),
                                     checkpoint=self.checkpoint_provider)
            return Response(200, fleet_page.render(snap).encode(), "text/html; charset=utf-8")

        self.status = StatusServer(cfg.http.host, cfg.http.port, m, self.health)
        self.status.route("/", fleet)
        self.status.route("/fleet", fleet)
        self.status.route("/tlog/", TlogRoutes(cfg.journal_path, cfg.pki_dir / "log.pub"))
        for path, handler in self.extra_routes.items():
            self.status.route(path, handler)
        self.status.start()
        log.info("metrics on http://%s:%d/metrics, fleet page on /", cfg.http.host, self.status.port)

    def _checkpoint_state(self) -> dict[str, str] | None:
        """The fleet page's view of the log: newest signed checkpoint and newest anchored one."""
        if self.journal is None:
            return None
        newest = self.journal.latest_checkpoint()
        if newest is None:
            return None
        anchored = self.journal.latest_checkpoint(anchored=True)
        state = {"signed tree size": str(newest["size"]), "root (hex)": str(newest["root"]),
                 "signed at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(newest["created_at"]))}
        if anchored is None:
            state["anchored"] = "not yet"
        else:
            state.update({"anchored tree size": str(anchored["size"]), "anchored in block": str(anchored["block_number"]),
                          "anchoring transaction": str(anchored["tx_hash"])})
        return state

    def _children(self) -> list[tuple[str, bool]]:
        out = []
        if self.broker is not None:
            out.append(("mosquitto", self.broker.alive()))
        if self.anvil is not None:
            out.append(("anvil", bool(self.anvil.running)))
        return out

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON) of every check; 503 names what failed and how to fix it."""
        from .health import report, run_checks

        return report(run_checks(self.health_checks))

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
        from .receipts import ReceiptBook, ReceiptSender

        app = make_app(self.cfg, consumer=True)
        book = ReceiptBook(self.cfg.journal_path, batch=self.cfg.worker.receipt_batch)
        if self.cfg.peers:  # several coordinators: confirm what this one stored before a crash, before re-sends
            book.prime()
        receipts = ReceiptSender(book, lambda: make_app(self.cfg, consumer=False), self.cfg.worker.receipt_interval)
        receipts.start(ready=self.worker_ready)
        register_tasks(app, Ingestor(self.journal, self.metrics, on_reading=book.note))
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
            without_heartbeat=False, without_mingle=True, without_gossip=True, redirect_stdouts=False,
        )
        try:
            worker.start()
        finally:
            self.worker_ready.clear()
            receipts.stop()

    # -- stop -----------------------------------------------------------------------
    def stop(self, flush_timeout: float = 30.0) -> None:
        self.stopping.set()
        self._stop.set()
        if self.writer is not None:
            self.writer.wake.set()  # out of its idle wait now
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
