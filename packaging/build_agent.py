"""Build the one-file `edge-agent` binary: `python packaging/build_agent.py [--force]`.

Why a script around PyInstaller: it keeps a work dir (build/pyinstaller) between
builds so a rebuild reuses the analysis cache, and it skips the build entirely when
dist/edge-agent is newer than every source it contains (tests call it repeatedly).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "packaging" / "edge-agent.spec"
SOURCES = ("agent", "security", "kombu_mqtt", "packaging")


def binary_path(dist: Path | None = None) -> Path:
    return (dist or ROOT / "dist") / "edge-agent"


def newest_source() -> float:
    newest = 0.0
    for top in SOURCES:
        for path in (ROOT / top).rglob("*"):
            if path.suffix in (".py", ".spec") and "__pycache__" not in path.parts:
                newest = max(newest, path.stat().st_mtime)
    return newest


def up_to_date(binary: Path) -> bool:
    return binary.exists() and binary.stat().st_mtime >= newest_source()


def build(dist: Path | None = None, work: Path | None = None, force: bool = False, quiet: bool = True) -> Path:
    """Build (or reuse) the binary; returns its path. Raises RuntimeError with the log tail."""
    dist = dist or ROOT / "dist"
    work = work or ROOT / "build" / "pyinstaller"
    binary = binary_path(dist)
    work.mkdir(parents=True, exist_ok=True)
    with open(work.parent / "edge-agent.build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a test and a bench may ask for the binary at once
        if not force and up_to_date(binary):
            return binary
        cmd = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--distpath", str(dist),
               "--workpath", str(work), "--log-level", "WARN", str(SPEC)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=quiet, text=True, timeout=900)
        if proc.returncode != 0:
            tail = "\n".join(((proc.stderr or "") + (proc.stdout or "")).splitlines()[-30:])
            raise RuntimeError(f"PyInstaller failed (exit {proc.returncode}):\n{tail}")
        os.utime(binary)
    return binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build dist/edge-agent with PyInstaller.")
    parser.add_argument("--force", action="store_true", help="rebuild even if the binary is up to date")
    parser.add_argument("--dist", type=Path, default=None, help="output directory (default dist/)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    binary = build(dist=args.dist, force=args.force, quiet=False)
    size = binary.stat().st_size
    print(f"{binary}: {size / 1e6:.1f} MB ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
