"""Build the one-file `edge-agent` binary: `python packaging/build_agent.py [--force]`.

Why a script around PyInstaller: it keeps a work dir (build/pyinstaller) between
builds so a rebuild reuses the analysis cache, and it skips the build entirely when
dist/edge-agent is newer than every source it contains (tests call it repeatedly).

Why not PyInstaller's one-file mode: it unpacks ~30 MB into $TMPDIR on every start
(RAM on a tmpfs /tmp). PyInstaller builds a one-dir bundle instead, and this script
wraps it into one file: packaging/launcher.sh (a POSIX sh header padded to HEADER_BYTES)
followed by a gzip'ed tar of the bundle. The launcher unpacks it once per version into
a private directory on disk and reuses it (see the launcher's header for the rules).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "packaging" / "edge-agent.spec"
SOURCES = ("agent", "security", "kombu_mqtt", "ledger", "packaging")  # ledger: the bundled ledger.sqlite_files
LAUNCHER = ROOT / "packaging" / "launcher.sh"
HEADER_BYTES = 8192  # the launcher header is padded to this size; the payload starts right after


def binary_path(dist: Path | None = None) -> Path:
    return (dist or ROOT / "dist") / "edge-agent"


def newest_source() -> float:
    newest = 0.0
    for top in SOURCES:
        for path in (ROOT / top).rglob("*"):
            if path.suffix in (".py", ".spec", ".sh") and "__pycache__" not in path.parts:
                newest = max(newest, path.stat().st_mtime)
    return newest


def up_to_date(binary: Path) -> bool:
    return binary.exists() and binary.stat().st_mtime >= newest_source()


def _tar_info(path: Path, arcname: str) -> tarfile.TarInfo:
    """Normalised entry: owner 0, no group/other write, fixed mtime (reproducible payload)."""
    info = tarfile.TarInfo(arcname)
    st = path.lstat()
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    if path.is_symlink():
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(path), 0o777
    elif path.is_dir():
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size = st.st_size
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    return info


def payload(onedir: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """gzip'ed tar of the one-dir bundle (sorted, normalised); `extra` adds files (tests)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9, format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(onedir.rglob("*")):
            arcname = path.relative_to(onedir).as_posix()
            info = _tar_info(path, arcname)
            if info.isreg():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
        for name, data in sorted((extra or {}).items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_launcher(onedir: Path, out: Path, extra: dict[str, bytes] | None = None) -> Path:
    """Write `out` = launcher header + payload of `onedir` (must contain the `edge-agent` executable).

    Written to a temp file and renamed, so a running launcher never reads a half-written file."""
    if not os.access(onedir / "edge-agent", os.X_OK):
        raise RuntimeError(f"{onedir}/edge-agent is missing or not executable: build the one-dir bundle first")
    data = payload(onedir, extra)
    digest = hashlib.sha256(data).hexdigest()
    header = (LAUNCHER.read_text().replace("@PAYLOAD_SHA256@", digest).replace("@VERSION@", digest[:16])
              .replace("@HEADER_BYTES@", str(HEADER_BYTES)))
    if "@" in "".join(line for line in header.splitlines() if line.startswith(("payload", "version", "header"))):
        raise RuntimeError(f"{LAUNCHER}: a placeholder was not filled")
    raw = header.encode()
    pad = HEADER_BYTES - len(raw) - len(b"exit 1\n")
    if pad < 2:
        raise RuntimeError(f"{LAUNCHER} is {len(raw)} bytes: raise HEADER_BYTES in {__file__}")
    # The launcher ends with `exec`; the padding is a comment line so sh never reads the tar.
    raw += b"exit 1\n" + b"#" * (pad - 1) + b"\n"
    assert len(raw) == HEADER_BYTES
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


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
        onedir_dist = work / "dist"
        cmd = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--distpath", str(onedir_dist),
               "--workpath", str(work), "--log-level", "WARN", str(SPEC)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=quiet, text=True, timeout=900)
        if proc.returncode != 0:
            tail = "\n".join(((proc.stderr or "") + (proc.stdout or "")).splitlines()[-30:])
            raise RuntimeError(f"PyInstaller failed (exit {proc.returncode}):\n{tail}")
        write_launcher(onedir_dist / "edge-agent", binary)
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
