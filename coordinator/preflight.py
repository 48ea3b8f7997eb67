"""What `run` checks before it starts anything: the files it needs, and a readable journal.

Why before: a missing certificate or a corrupt journal found after Mosquitto and anvil
started (and were torn down again) buries the cause under their logs, and the error
then raised deep inside a component names the wrong fix. Each check here raises one
CoordinatorError that names the file, the cause and the fix.
"""

from __future__ import annotations

from pathlib import Path

from security import exit_codes

from .config import CoordinatorConfig
from .errors import CoordinatorError


def corrupt_database(path: Path, exc: BaseException) -> CoordinatorError:
    """The one message for a SQLite file that cannot be read (exit DATA_CORRUPT)."""
    return CoordinatorError(
        f"{path} is corrupt or not a SQLite database ({exc}): stop the coordinator, then recover it "
        f"(`sqlite3 {path} .recover | sqlite3 {path}.recovered`, check it, move it in place) "
        "or restore a backup (docs/OPERATIONS.md)", exit_codes.DATA_CORRUPT)


def check_database(path: Path, at_start: bool = False) -> None:
    """Raise DATA_CORRUPT unless `path` is absent (created later) or a readable SQLite file.

    at_start (`run`): the start-up check of ledger.sqlite_files, a full scan only after an
    unclean stop (the journal only grows; a scan at every start delays every restart)."""
    from ledger.sqlite_files import unreadable_at_start, unreadable_reason

    reason = unreadable_at_start(path) if at_start else unreadable_reason(path)
    if reason is not None:
        raise corrupt_database(path, RuntimeError(reason))


def required_files(cfg: CoordinatorConfig) -> list[Path]:
    from .fleet_pki import FleetStore

    files = [cfg.ca_path, cfg.crl_path, cfg.cert_path, cfg.key_path]
    if cfg.holds_ca:  # a peer coordinator's data dir has no CA key (coordinator/peers.py)
        files.insert(1, cfg.pki_dir / "ca.key")
    if cfg.managed_broker:
        store = FleetStore(cfg)
        files += [store.broker_cert, store.broker_key]
    return files


def check_run(cfg: CoordinatorConfig) -> None:
    """Everything `run` needs exists and is readable, or one line saying which and how to fix it."""
    for path in required_files(cfg):
        if not path.is_file() and path.parent == cfg.pki_dir and path.name.startswith("ca."):
            raise CoordinatorError(
                f"{path} is missing: restore {cfg.pki_dir} from a backup (a new fleet CA would mean re-enrolling "
                "every agent: `edge-coordinator init` on a new data dir)")
        if not path.is_file():
            raise CoordinatorError(
                f"{path} is missing: restore {cfg.pki_dir} from a backup, or re-issue the coordinator and broker "
                f"certificates from the fleet CA with `edge-coordinator init --repair --data-dir {cfg.data_dir}`")
    check_database(cfg.journal_path, at_start=True)
