"""ManagedAnvil: a local anvil chain as a child process with crash-safe state snapshots.

Why not anvil's own `--state`: it rewrites the dump in place without fsync, so a SIGKILL
can leave a truncated file anvil refuses to load. Here snapshots are taken with
`anvil_dumpState`, written to a temp file, fsynced and renamed, keeping the previous
copy; a restart loads the latest and falls back to the previous one.

The child is a `ledger.processes.ChildProcess` (own session, stopped as a group) with
PDEATHSIG=SIGKILL (Linux), so it dies with the thread that started it: start it from a
long-lived thread (normally the main thread).
"""

from __future__ import annotations

import binascii
import gzip
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kombu_mqtt.backoff import Backoff

from .node_tools import find_node_tool
from .processes import ChildProcess, ProcessStartError, free_port

__all__ = ["AnvilError", "ManagedAnvil", "dump_is_consistent", "find_anvil", "free_port", "rpc_call"]

log = logging.getLogger(__name__)

STATE_FILE = "anvil-state.json"
PREVIOUS_STATE_FILE = "anvil-state.prev.json"


class AnvilError(RuntimeError):
    """The managed anvil could not be found, started or snapshotted."""


def find_anvil() -> str:
    """EDGE_ANVIL_BIN, else node_modules/.bin/anvil of this repo, else anvil on PATH."""
    return find_node_tool("anvil", "EDGE_ANVIL_BIN", AnvilError, "or set EDGE_ANVIL_BIN")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rpc_call(url: str, method: str, params: list[Any] | None = None, timeout: float = 30.0) -> Any:
    """One JSON-RPC call with the standard library (no web3 needed for supervision)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        reply = json.loads(resp.read())
    if "error" in reply:
        raise AnvilError(f"{method} failed: {reply['error']}")
    return reply["result"]


def dump_is_consistent(dump: dict[str, Any]) -> bool:
    """True when every externally owned account's nonce equals its mined transactions.

    A dump whose state includes a transaction missing from its blocks (or the reverse)
    fails this check.
    """
    sent: dict[str, int] = {}
    for tx in dump.get("transactions", []):
        sender = str(tx.get("info", {}).get("from", "")).lower()
        sent[sender] = sent.get(sender, 0) + 1
    for address, account in dump.get("accounts", {}).items():
        if account.get("code") not in (None, "", "0x"):
            continue  # contracts: nonce counts creations, not transactions
        if int(account.get("nonce", 0)) != sent.get(address.lower(), 0):
            return False
    return True


class ManagedAnvil:
    """A loopback anvil. `ManagedAnvil(state_dir).start()`; `.rpc_url`, `.private_keys`.

    state_dir: where snapshots live (None: no snapshots). snapshot_interval: seconds
    between automatic snapshots (None: only on `snapshot()` and `stop()`).
    The port stays the same across `restart()` so clients keep their URL.
    """

    def __init__(
        self,
        state_dir: str | Path | None = None,
        *,
        port: int | None = None,
        chain_id: int = 31337,
        accounts: int = 4,
        snapshot_interval: float | None = None,
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.binary = binary or find_anvil()
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.port = port or free_port()
        self._port_chosen = port is None  # ours to change if another process takes it first
        self.chain_id = chain_id
        self.accounts = accounts
        self.snapshot_interval = snapshot_interval
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.process: ChildProcess | None = None
        self.private_keys: list[str] = []
        self.addresses: list[str] = []
        self.loaded_from: Path | None = None
        self._snap_lock = threading.Lock()
        self._stop_snapshots = threading.Event()
        self._snap_thread: threading.Thread | None = None
        self._workdir = self.state_dir or Path(os.environ.get("TMPDIR", "/tmp"))

    # -- lifecycle ------------------------------------------------------------------
    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dev_key(self) -> str:
        """The first funded dev account's private key (0x hex)."""
        return self.private_keys[0]

    def __enter__(self) -> ManagedAnvil:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ManagedAnvil:
        """Start anvil, loading the newest loadable snapshot if state_dir has one."""
        if self.running:
            return self
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        candidates: list[Path | None] = []
        if self.state_dir is not None:
            candidates = [p for p in (self.state_dir / STATE_FILE, self.state_dir / PREVIOUS_STATE_FILE) if p.exists()]
        candidates.append(None)
        last_error = ""
        for state in candidates:
            try:
                self._spawn_on_a_free_port(state)
                self.loaded_from = state
                if state is not None:
                    log.info("anvil on %s loaded state from %s", self.rpc_url, state)
                break
            except AnvilError as exc:
                last_error = str(exc)
                log.warning("anvil did not start%s: %s", f" from {state}" if state else "", exc)
        else:
            fix = (f"; another process listens on 127.0.0.1:{self.port}: stop it or choose another port"
                   if "Address already in use" in last_error else "")
            raise AnvilError(f"anvil failed to start on port {self.port}: {last_error}{fix}")
        if self.snapshot_interval and self.state_dir is not None:
            self._stop_snapshots.clear()
            self._snap_thread = threading.Thread(target=self._snapshot_loop, name="anvil-snapshots", daemon=True)
            self._snap_thread.start()
        return self

    def _spawn_on_a_free_port(self, state: Path | None, attempts: int = 3) -> None:
        """`_spawn`; when the port was picked here (free_port) and another process bound it
        between the pick and anvil's bind, pick again: a race, not the caller's error."""
        for attempt in range(attempts):
            try:
                self._spawn(state)
                return
            except AnvilError as exc:
                if not (self._port_chosen and "Address already in use" in str(exc) and attempt < attempts - 1):
                    raise
                log.info("port %d was taken before anvil bound it; picking another", self.port)
                self.port = free_port()

    def _spawn(self, state: Path | None) -> None:
        config_out = self._workdir / f".anvil-{self.port}-config.json"
        config_out.unlink(missing_ok=True)
        args = [
            self.binary, "--host", "127.0.0.1", "--port", str(self.port), "--chain-id", str(self.chain_id),
            "--accounts", str(self.accounts), "--config-out", str(config_out), *self.extra_args,
        ]
        if state is not None:
            args += ["--load-state", str(state)]
        log_path = self._workdir / f".anvil-{self.port}.log"
        child = ChildProcess("anvil", args, log_path, die_with_parent=True, fix="run `make setup` or set EDGE_ANVIL_BIN")

        def answers() -> bool:
            try:
                rpc_call(self.rpc_url, "eth_chainId", timeout=2)
            except (OSError, urllib.error.URLError, AnvilError):
                return False
            return config_out.exists()

        try:
            child.start().wait_until(answers, self.startup_timeout, f"JSON-RPC answer on {self.rpc_url}")
        except ProcessStartError as exc:
            child.kill()
            raise AnvilError(str(exc)) from None
        self.process = child
        config = json.loads(config_out.read_text())
        config_out.unlink(missing_ok=True)
        self.private_keys = list(config["private_keys"])
        self.addresses = list(config["available_accounts"])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self, snapshot: bool = True) -> None:
        """Snapshot (if state_dir) and stop anvil gracefully."""
        self._stop_snapshots.set()
        if self._snap_thread is not None:
            self._snap_thread.join(timeout=30)
            self._snap_thread = None
        if self.running and snapshot and self.state_dir is not None:
            try:
                self.snapshot()
            except (AnvilError, OSError) as exc:
                log.warning("final anvil snapshot failed: %s", exc)
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL anvil without a snapshot (crash simulation)."""
        self._stop_snapshots.set()
        if self._snap_thread is not None:
            self._snap_thread.join(timeout=30)
            self._snap_thread = None
        self._terminate(signal.SIGKILL)

    def restart(self) -> ManagedAnvil:
        """Start again on the same port from the latest (or previous) snapshot."""
        if self.running:
            self.stop()
        return self.start()

    def _terminate(self, sig: int) -> None:
        child, self.process = self.process, None
        if child is not None:
            child.stop(timeout=10, sig=sig)

    # -- snapshots ------------------------------------------------------------------
    def snapshot(self, attempts: int = 20) -> Path:
        """anvil_dumpState -> temp file -> fsync -> rename; the previous copy is kept.

        anvil can dump the state of a transaction being mined without its block (state
        ahead of history: the contract says "recorded" but the event is gone after a
        restore). Such dumps are detected (`dump_is_consistent`) and taken again.
        """
        if self.state_dir is None:
            raise AnvilError("snapshot needs a state_dir: construct ManagedAnvil(state_dir=...)")
        with self._snap_lock:
            retry = Backoff(0.02, 0.4, jitter=False)  # until the chain is between two transactions
            for _ in range(attempts):
                dumped = rpc_call(self.rpc_url, "anvil_dumpState", timeout=120)
                data = gzip.decompress(binascii.unhexlify(dumped[2:] if dumped.startswith("0x") else dumped))
                if dump_is_consistent(json.loads(data)):  # never replace a good snapshot with garbage
                    break
                time.sleep(retry.next())
            else:
                raise AnvilError(f"anvil_dumpState gave {attempts} inconsistent dumps (chain busy): previous "
                                 "snapshot kept, try again")
            latest = self.state_dir / STATE_FILE
            tmp = self.state_dir / f".{STATE_FILE}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if latest.exists():
                os.replace(latest, self.state_dir / PREVIOUS_STATE_FILE)
            os.replace(tmp, latest)
            _fsync_dir(self.state_dir)
            return latest

    def _snapshot_loop(self) -> None:
        while not self._stop_snapshots.wait(self.snapshot_interval):
            if not self.running:
                return
            try:
                self.snapshot()
            except (AnvilError, OSError, ValueError) as exc:
                log.warning("periodic anvil snapshot failed: %s", exc)
