"""The one-file launcher (packaging/launcher.sh) around a stand-in one-dir bundle.

Why a stand-in: the launcher's rules (unpack once, reuse while intact, replace on a new
binary, refuse a directory others can write, clean stale unpacks) do not depend on what
it runs, so a two-line `edge-agent` script exercises them in milliseconds; the real
PyInstaller bundle goes through the same code in tests/agent/test_binary.py.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import threading
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_agent", ROOT / "packaging" / "build_agent.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


build_agent = _build_module()


@pytest.fixture
def onedir(tmp_path: Path) -> Path:
    """A stand-in bundle: `edge-agent` prints where it runs from and its arguments."""
    d = tmp_path / "onedir"
    (d / "_internal").mkdir(parents=True)
    exe = d / "edge-agent"
    exe.write_text('#!/bin/sh\nprintf "%s\\n" "$0" "$@"\n')
    exe.chmod(0o755)
    (d / "_internal" / "libstub.so").write_bytes(b"\0" * 4096)
    return d


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    return tmp_path / "state" / "runtime"


def launch(binary: Path, runtime: Path | None, *args: str, env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    if runtime is not None:
        full["EDGE_AGENT_RUNTIME_DIR"] = str(runtime)
    full.update(env or {})
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60, env=full)


def version_dirs(runtime: Path) -> list[Path]:
    return sorted(p for p in runtime.iterdir() if p.name != ".lock")


def ran_from(proc: subprocess.CompletedProcess) -> Path:
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.splitlines()[0]).parent


def test_unpacks_once_and_reuses_the_same_files(onedir: Path, runtime: Path, tmp_path: Path) -> None:
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    first = launch(binary, runtime, "run", "--interval", "5")
    vdir = ran_from(first)
    assert first.stdout.splitlines()[1:] == ["run", "--interval", "5"]  # arguments pass through
    assert vdir.parent == runtime.resolve() and version_dirs(runtime) == [vdir]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [vdir, *vdir.rglob("*")]}

    second = launch(binary, runtime, "status")
    assert ran_from(second) == vdir
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [vdir, *vdir.rglob("*")]}
    assert after == before  # same directory, same inodes, nothing rewritten


def test_unpacked_tree_is_private_and_matches_the_bundle(onedir: Path, runtime: Path, tmp_path: Path) -> None:
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    vdir = ran_from(launch(binary, runtime))
    assert (runtime.stat().st_mode & 0o077) == 0 and (vdir.stat().st_mode & 0o077) == 0
    for p in vdir.rglob("*"):
        assert not p.stat().st_mode & 0o022, p  # nothing group/other writable
    assert (vdir / "_internal" / "libstub.so").read_bytes() == b"\0" * 4096
    assert (vdir / "edge-agent").read_bytes() == (onedir / "edge-agent").read_bytes()


def test_new_binary_is_unpacked_next_to_the_old_and_replaces_it(onedir: Path, runtime: Path, tmp_path: Path) -> None:
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    old = ran_from(launch(binary, runtime))
    build_agent.write_launcher(onedir, binary, extra={"_internal/release.txt": b"v2\n"})  # "upgrade" in place
    new = ran_from(launch(binary, runtime))
    assert new != old and new.parent == old.parent
    assert (new / "_internal" / "release.txt").read_text() == "v2\n"
    assert version_dirs(runtime) == [new]  # the old version was removed once the new one was in place


def test_old_version_in_use_is_kept_until_it_is_released(onedir: Path, runtime: Path, tmp_path: Path) -> None:
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    old = ran_from(launch(binary, runtime))
    build_agent.write_launcher(onedir, binary, extra={"_internal/release.txt": b"v2\n"})
    with open(old / ".manifest") as held:  # what a running agent of the old version holds (fd 8)
        fcntl.flock(held, fcntl.LOCK_SH)
        new = ran_from(launch(binary, runtime))
        assert version_dirs(runtime) == sorted([old, new])
    assert ran_from(launch(binary, runtime)) == new  # next start: the old one is free, so removed
    assert version_dirs(runtime) == [new]


def test_stale_and_interrupted_unpacks_are_cleaned(onedir: Path, runtime: Path, tmp_path: Path) -> None:
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    vdir = ran_from(launch(binary, runtime))
    stale = runtime / "0123456789abcdef"
    (stale / "_internal").mkdir(parents=True)
    (stale / ".manifest").write_text("old\n")
    broken = runtime / ".new.AbC123"  # an unpack killed half way
    (broken / "_internal").mkdir(parents=True)
    assert ran_from(launch(binary, runtime)) == vdir
    assert version_dirs(runtime) == [vdir]


def test_damaged_unpack_is_replaced(onedir: Path, runtime: Path, tmp_path: Path) -> None:
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    vdir = ran_from(launch(binary, runtime))
    lib = vdir / "_internal" / "libstub.so"
    lib.write_bytes(b"\0" * 100)  # truncated (e.g. power cut while unpacking, disk error)
    assert ran_from(launch(binary, runtime)) == vdir
    assert lib.read_bytes() == b"\0" * 4096


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_refuses_a_runtime_dir_others_can_write(onedir: Path, runtime: Path, tmp_path: Path, mode: int) -> None:
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    runtime.mkdir(parents=True)
    runtime.chmod(mode)
    proc = launch(binary, runtime)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "writable by group/others" in proc.stderr and "chmod 700" in proc.stderr
    assert version_dirs(runtime) == []  # nothing unpacked, nothing run


def test_refuses_a_runtime_dir_under_a_parent_others_can_write(onedir: Path, tmp_path: Path) -> None:
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone could rename our dir away and put theirs in place
    proc = launch(binary, shared / "runtime")
    assert proc.returncode == 1 and "parent of runtime dir" in proc.stderr and proc.stdout == ""
    shared.chmod(0o1777)  # sticky like /tmp: others cannot replace our entry
    assert ran_from(launch(binary, shared / "runtime")).parent == (shared / "runtime").resolve()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory to another uid")
def test_refuses_a_runtime_dir_owned_by_another_user(onedir: Path, runtime: Path, tmp_path: Path) -> None:
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    runtime.mkdir(parents=True, mode=0o700)
    os.chown(runtime, 54321, 54321)
    proc = launch(binary, runtime)
    assert proc.returncode == 1 and "not owned by uid" in proc.stderr and proc.stdout == ""


def test_refuses_a_damaged_binary(onedir: Path, runtime: Path, tmp_path: Path) -> None:
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    raw = bytearray(binary.read_bytes())
    raw[build_agent.HEADER_BYTES + 100] ^= 0xFF
    binary.write_bytes(bytes(raw))
    proc = launch(binary, runtime)
    assert proc.returncode == 1 and "is damaged" in proc.stderr and "reinstall" in proc.stderr
    assert version_dirs(runtime) == []  # the bad payload was not left behind


def test_runtime_dir_defaults_to_the_data_dir(onedir: Path, tmp_path: Path) -> None:
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    data = tmp_path / "data"
    assert ran_from(launch(binary, None, "--data-dir", str(data), "status")).parent == (data / "runtime").resolve()
    other = tmp_path / "other"
    assert ran_from(launch(binary, None, "status", env={"EDGE_AGENT_DATA_DIR": str(other)})).parent == \
        (other / "runtime").resolve()


def test_concurrent_first_starts_unpack_once(onedir: Path, runtime: Path, tmp_path: Path) -> None:
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    results: list[subprocess.CompletedProcess] = []
    threads = [threading.Thread(target=lambda: results.append(launch(binary, runtime))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dirs = {ran_from(r) for r in results}
    assert len(results) == 4 and len(dirs) == 1
    assert version_dirs(runtime) == list(dirs)


@pytest.mark.skipif(not Path("/usr/bin/busybox").exists() and not Path("/bin/busybox").exists(),
                    reason="busybox not installed (apt-get install busybox)")
def test_runs_with_busybox_tools_only(onedir: Path, runtime: Path, tmp_path: Path) -> None:
    """A minimal device: busybox ash and applets, nothing from coreutils/util-linux."""
    busybox = Path("/usr/bin/busybox") if Path("/usr/bin/busybox").exists() else Path("/bin/busybox")
    applets = set(subprocess.run([str(busybox), "--list"], capture_output=True, text=True).stdout.split())
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("sh", "tail", "tar", "gzip", "sha256sum", "find", "stat", "sort", "cmp", "mktemp", "flock", "sync",
                 "mv", "rm", "mkdir", "id", "cat"):
        if name in applets:
            (tools / name).symlink_to(busybox)
    binary = build_agent.write_launcher(onedir, tmp_path / "edge-agent")
    env = {"PATH": str(tools), "EDGE_AGENT_RUNTIME_DIR": str(runtime)}

    def bb(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(busybox), "sh", str(binary), *args], capture_output=True, text=True, timeout=60,
                              env=env)

    vdir = ran_from(bb("status"))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [vdir, *vdir.rglob("*")]}
    assert ran_from(bb("status")) == vdir
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [vdir, *vdir.rglob("*")]} == before
    runtime.chmod(0o777)
    refused = bb("status")
    assert refused.returncode == 1 and "writable by group/others" in refused.stderr
