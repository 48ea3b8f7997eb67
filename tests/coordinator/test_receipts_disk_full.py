"""A full disk under the journal loses nothing, is reported, and heals by itself (issue #11).

The journal lives on its own small tmpfs (journal.db a symlink into it, the way an
operator puts it on a separate volume; SQLite keeps -wal/-shm next to the target). A
filler file leaves a few hundred KiB free while an agent streams, so the journal hits
SQLITE_FULL mid-stream. While it is full: no reading leaves the agent's outbox without
being journaled, /healthz fails naming the journal, the failure metric counts and the
log says what to fix. Deleting the filler frees the space: ingestion resumes without
any restart and every reading is journaled and anchored exactly once.

Real processes: `edge-coordinator run` (Mosquitto with mutual TLS, anvil), `edge-agent run`.
Needs root (or CAP_SYS_ADMIN) for `mount -t tmpfs`; skipped otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.support import Proc, kill_group
from tests.support.prom import sample

from .support import CoordinatorProcess, verified_anchored, wait_until
from .test_receipts_e2e import drain_and_check, enroll, outbox, run_agent, seqs

pytestmark = pytest.mark.slow

FS_SIZE = "64m"
HEADROOM = 384 * 1024  # bytes left free by the filler: a few dozen ingest commits


@pytest.fixture
def journal_fs(coordinator: CoordinatorProcess, tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs, unmounted after the coordinator stopped (whatever the test did)."""
    mnt = tmp_path / "journal-fs"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` binary: cannot give the journal a small file system of its own")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(mnt)],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {out.stderr.strip() or out.returncode}")
    try:
        yield mnt
    finally:
        coordinator.cleanup()  # nothing may hold the journal open while we unmount
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)


def health(coordinator: CoordinatorProcess) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{coordinator.http_port}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def failures(coordinator: CoordinatorProcess) -> float:
    return sample(coordinator.metrics(), "edgeledger_journal_write_failures_total", task="edge.ingest") or 0


def outbox_seqs(home: Path) -> set[int]:
    db = sqlite3.connect(f"file:{home / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return {r[0] for r in db.execute("SELECT seq FROM outbox WHERE task_name = 'edge.ingest'")}
    finally:
        db.close()


def fill(mnt: Path, leave: int) -> Path:
    """A filler file taking all but `leave` bytes of the file system (or all of it, when
    the journal grows faster than the filler is written: the disk is full either way)."""
    st = os.statvfs(mnt)
    size = st.f_bavail * st.f_frsize - leave
    filler = mnt / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as out:
        try:
            while size > 0:
                size -= out.write(chunk[:min(size, len(chunk))])
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def test_disk_full_journal_loses_nothing_reports_and_resumes_by_itself(
        coordinator: CoordinatorProcess, journal_fs: Path, tmp_path: Path, procs: list[Proc]) -> None:
    coordinator.init("rf-a")
    journal = coordinator.data_dir / "journal.db"
    for suffix in ("", "-wal", "-shm"):  # the journal (if init made one) moves onto the small file system
        path = Path(f"{journal}{suffix}")
        if path.exists():
            shutil.move(path, journal_fs / path.name)
    journal.symlink_to(journal_fs / "journal.db")
    coordinator.start()
    home = enroll(coordinator, "rf-a", tmp_path / "rf-a")
    # no re-sends from the agent while it streams: a reading the coordinator acked without
    # storing would stay a gap (a re-send would hide it); the drain below re-sends as usual
    procs.append(run_agent(home, "0.05", "run1.log", EDGE_AGENT_RESEND_AFTER="3600"))
    wait_until(lambda: len(seqs(coordinator, "rf-a")) >= 20, 120, "streaming")
    assert (journal_fs / "journal.db-wal").exists()  # SQLite writes next to the symlink's target

    filler = fill(journal_fs, HEADROOM)
    wait_until(lambda: failures(coordinator) >= 1, 180, "a journal write refused with SQLITE_FULL")
    # red: /healthz names the journal and the cause
    code, body = wait_until(lambda: (lambda h: h if h[0] == 503 else None)(health(coordinator)), 60,
                            "/healthz failing")
    check = body["checks"]["journal"]
    assert check["ok"] is False and str(journal) in check["detail"] and "full" in check["detail"], check
    assert "free disk space" in check["fix"]
    # the refused messages stay with the broker and are retried (each retry counted)
    counted = failures(coordinator)
    wait_until(lambda: failures(coordinator) >= counted + 8, 90, "the refused tasks retried")
    # nothing confirmed to the agent that is not journaled: every seq gone from its outbox is stored
    stored, (_, last) = set(seqs(coordinator, "rf-a")), outbox(home)
    confirmed = set(range(1, last + 1)) - outbox_seqs(home)
    assert confirmed <= stored, sorted(confirmed - stored)[:20]
    assert outbox(home)[0] > 0  # the agent keeps what is not journaled
    log = coordinator.log()
    assert "cannot be written (database or disk is full)" in log and "Fix: free disk space" in log
    held = len(stored)

    filler.unlink()  # space again: no restart, no operator action on the coordinator
    wait_until(lambda: len(seqs(coordinator, "rf-a")) > held + 20, 180, "ingestion resumed by itself")
    # every refused message came back from the broker: no gap although the agent re-sent nothing
    wait_until(lambda: (lambda s: s == list(range(1, len(s) + 1)))(seqs(coordinator, "rf-a")), 120,
               "the refused readings journaled from the broker's redelivery")
    wait_until(coordinator.healthy, 60, "/healthz ok again")
    assert "is writable again: ingestion resumed" in coordinator.log()

    kill_group(procs.pop().proc)
    last = drain_and_check(coordinator, home, "rf-a", procs)  # seqs 1..last exactly once, outbox empty
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=30)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        db.close()
    wait_until(coordinator.all_confirmed, 180, "every journal row anchored")
    report = verified_anchored(coordinator.data_dir)
    assert report["rows"] == coordinator.query("SELECT COUNT(*) FROM executions")[0][0]
    (agent,) = [c for c in report["completeness"] if c["agent_id"] == "rf-a"]
    assert agent["stored"] == last and agent["missing"] == 0
    print(f"disk full: {held} readings journaled when the journal filled, {failures(coordinator):g} refused "
          f"journal writes, {last} readings journaled and anchored exactly once")
