"""/healthz checks: each says what is wrong and how to fix it.

Why real probes: "the journal file exists" says nothing about whether the next task can
be committed (read-only mount, full disk, a stuck lock holder), so the journal check
writes one row to a scratch table in a real transaction; a chain writer that is alive
but not getting rows on chain shows up as anchoring lag, not as a dead thread.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

PROBE_TABLE = "health_probe"


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str
    fix: str = ""  # empty when ok

    def as_json(self) -> dict[str, object]:
        out = asdict(self)
        if self.ok:
            out.pop("fix")
        return out


Check = Callable[[], CheckResult]


def run_checks(checks: dict[str, Check]) -> dict[str, CheckResult]:
    """Run every check; one that raises is a failed check naming the exception, never a crashed probe."""
    out: dict[str, CheckResult] = {}
    for name, check in checks.items():
        try:
            out[name] = check()
        except Exception as exc:  # noqa: BLE001 - /healthz must answer whatever a check does
            out[name] = CheckResult(False, f"check raised {type(exc).__name__}: {exc}",
                                    f"see the coordinator log; the {name} check itself failed")
    return out


def report(results: dict[str, CheckResult]) -> tuple[int, dict[str, object]]:
    """(HTTP status, JSON body): 503 when any check failed."""
    ok = all(r.ok for r in results.values())
    return (200 if ok else 503), {"ok": ok, "checks": {name: r.as_json() for name, r in results.items()}}


def tcp_reachable(url: str, default_port: int, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to `url`'s host:port opens, else the error text."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def broker_check(url: str, managed_alive: Callable[[], bool] | None) -> Check:
    def check() -> CheckResult:
        if managed_alive is not None and not managed_alive():
            return CheckResult(False, "the managed Mosquitto is not running",
                               "see the Mosquitto log under <data_dir>/run/mosquitto; the coordinator restarts it")
        error = tcp_reachable(url, 8883)
        if error:
            return CheckResult(False, f"broker {url} unreachable ({error})",
                               "start the broker or fix broker.url / broker.port in coordinator.toml")
        return CheckResult(True, f"broker {url} reachable")
    return check


def chain_block_number(url: str, timeout: float = 3.0) -> int:
    """eth_blockNumber over JSON-RPC: the node answers, not just its port; raises OSError/ValueError/TypeError."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        answer = json.loads(resp.read())
    if not isinstance(answer, dict) or "result" not in answer:
        raise ValueError(f"no result in the JSON-RPC answer: {str(answer)[:200]}")
    return int(answer["result"], 16)


def chain_check(url: str, managed_alive: Callable[[], bool] | None) -> Check:
    def check() -> CheckResult:
        if managed_alive is not None and not managed_alive():
            return CheckResult(False, "the managed anvil is not running",
                               "see the coordinator log; it restarts anvil from its last snapshot")
        try:
            block = chain_block_number(url)
        except (OSError, ValueError, TypeError) as exc:
            return CheckResult(False, f"chain {url} does not answer eth_blockNumber ({exc})",
                               "start the chain node or fix chain.url / chain.port in coordinator.toml")
        return CheckResult(True, f"chain {url} answers, block {block}")
    return check


def journal_write_probe(path: Path, timeout: float = 2.0) -> None:
    """Write and commit one row in a scratch table of the journal file; raises sqlite3.Error.

    A real commit through SQLite, so what would stop the next ingest commit stops the
    probe too: a full disk, I/O errors, a read-only WAL file or file system, another
    process holding the write lock. `mode=rw` never creates a missing journal.
    """
    conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"CREATE TABLE IF NOT EXISTS {PROBE_TABLE} (id INTEGER PRIMARY KEY, probed_at REAL NOT NULL)")
        conn.execute(f"INSERT OR REPLACE INTO {PROBE_TABLE} (id, probed_at) VALUES (1, ?)", (time.time(),))
        conn.execute("COMMIT")
    finally:
        conn.close()


def journal_check(path: Path, timeout: float) -> Check:
    fix = ("free disk space, make the journal, its -wal/-shm files and its directory writable by the coordinator, "
           "or stop the process holding the journal's write lock")

    def check() -> CheckResult:
        if not path.exists():
            return CheckResult(False, f"journal {path} does not exist",
                               "restore the journal or check data_dir in coordinator.toml")
        # SQLite reuses this process's open descriptors, so a mode change would only bite at the
        # next start; the access check catches it now (for a non-root service user).
        for target in (path, path.parent):
            if not os.access(target, os.W_OK):
                return CheckResult(False, f"journal {path} is not writable ({target} denies write to uid "
                                          f"{os.geteuid()})", fix)
        try:
            journal_write_probe(path, timeout)
        except sqlite3.Error as exc:
            return CheckResult(False, f"journal {path} is not writable ({exc})", fix)
        return CheckResult(True, f"journal {path} writable")
    return check


def anchoring_check(journal_path: Path, max_lag: float, oldest: Callable[[Path], float | None],
                    now: Callable[[], float] = time.time) -> Check:
    def check() -> CheckResult:
        if not journal_path.exists():
            return CheckResult(True, "journal empty: nothing to anchor")
        first = oldest(journal_path)
        if first is None:
            return CheckResult(True, "every journal row is anchored")
        lag = max(0.0, now() - first)
        if lag > max_lag:
            return CheckResult(False, f"oldest unanchored journal row is {lag:.0f}s old (limit {max_lag:g}s)",
                               "check the chain (reachable, recorder account funded) and the chain writer in the "
                               "coordinator log; raise monitor.anchor_lag_max if this lag is expected")
        return CheckResult(True, f"oldest unanchored journal row is {lag:.0f}s old (limit {max_lag:g}s)")
    return check


def thread_check(name: str, alive: Callable[[], bool], fix: str) -> Check:
    def check() -> CheckResult:
        if alive():
            return CheckResult(True, f"{name} running")
        return CheckResult(False, f"{name} not running", fix)
    return check
