"""The one-file `dist/edge-agent` binary: builds, runs its CLI, and sends readings over mqtts.

Why a real build: PyInstaller misses modules that celery/kombu import by name; only
running the frozen binary end to end proves the hidden-import lists are complete.
The build is reused while no source is newer than the binary (packaging/build_agent.py).
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from security import pki
from tests.support.celery_apps import close_app
from tests.support.mosquitto import FleetPKI, MosquittoBroker

from .support import operator_app, send_command, start_agent, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.binary]


def _build() -> Path:
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("build_agent", root / "packaging" / "build_agent.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.build()


@pytest.fixture(scope="session")
def binary() -> Path:
    return _build()


def run(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)


def test_binary_cli_and_end_to_end(binary: Path, tmp_path: Path, test_pki: FleetPKI, mosquitto: MosquittoBroker,
                                   receiver_factory, procs: list) -> None:
    assert binary.stat().st_mode & stat.S_IXUSR
    proc = run(binary, "--help")
    assert proc.returncode == 0 and "keygen" in proc.stdout and "status" in proc.stdout
    data = tmp_path / "agent"
    proc = run(binary, "--data-dir", str(data), "keygen", "--id", "bin-1")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((data / "agent.key").stat().st_mode) == 0o600
    cert = tmp_path / "bin-1.pem"
    pki.write_pem(test_pki.ca.issue(pki.load_csr(data / "agent.csr")), cert)
    proc = run(binary, "--data-dir", str(data), "enroll", "--cert", str(cert), "--ca", str(test_pki.ca_path),
               "--broker-url", mosquitto.tls_url)
    assert proc.returncode == 0, proc.stderr

    rcv = receiver_factory(mosquitto.tls_url)
    procs.append(start_agent(data, mosquitto.tls_url, interval=0.2, binary=binary))
    wait_until(lambda: len(rcv.readings("bin-1")) >= 3, 60, what="3 readings from the binary")
    got = rcv.readings("bin-1")
    assert [r["kwargs"]["reading"]["seq"] for r in got] == list(range(1, len(got) + 1))
    assert {r["signer"] for r in got} == {"bin-1"}

    op = operator_app(test_pki, tmp_path, mosquitto.tls_url)
    try:  # the frozen worker runs a command and answers over rpc:// (signed result)
        assert send_command(op, "edge.agent.set_interval", "agent.bin-1", seconds=30) == {"interval": 30.0}
    finally:
        close_app(op)

    proc = run(binary, "--data-dir", str(data), "status", "--json")
    assert proc.returncode == 0 and '"agent_id": "bin-1"' in proc.stdout


def test_binary_unpacks_once_to_its_runtime_dir_and_reuses_it(binary: Path, tmp_path: Path) -> None:
    """The real bundle: nothing in $TMPDIR, one private version dir, not rewritten by a second start."""
    import os

    tmpdir, runtime = tmp_path / "tmp", tmp_path / "state" / "runtime"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "EDGE_AGENT_RUNTIME_DIR": str(runtime)}
    first = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert first.returncode == 0 and "keygen" in first.stdout, first.stderr
    (vdir,) = [p for p in runtime.iterdir() if p.name != ".lock"]
    files = [vdir / "edge-agent", *sorted((vdir / "_internal").rglob("*"))]
    assert len(files) > 20 and any(p.name.startswith("libpython") for p in files)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}

    second = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert [p for p in runtime.iterdir() if p.name != ".lock"] == [vdir]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == before
    assert list(tmpdir.iterdir()) == []  # no _MEI* unpack in TMPDIR
