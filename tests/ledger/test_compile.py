"""The committed contract artifact matches the Solidity source (recompiled with solcjs)."""

import json
import shutil

import pytest

from ledger import compile as solc


def test_committed_artifact_is_fresh():
    try:
        binary = solc.find_solcjs()
    except solc.CompilerMissing as exc:
        pytest.skip(f"solcjs not installed, cannot recompile: {exc}")
    if shutil.which("node") is None:
        pytest.skip("node is not installed: cannot run solcjs to recompile the contract")
    fresh = solc.render(solc.compile_artifact(binary))
    committed = solc.ARTIFACT.read_text()
    assert fresh == committed, "ledger/contracts/ExecutionLedger.json is stale: run `python -m ledger.compile`"


def test_artifact_settings():
    art = json.loads(solc.ARTIFACT.read_text())
    assert art["evmVersion"] == "cancun" and art["optimizer"]["enabled"] is True
    assert art["compiler"] == "solc 0.8.30"
    names = {item.get("name") for item in art["abi"]}
    # checkpoint anchoring replaced per-record anchoring (issue #12)
    assert {"anchorCheckpoint", "anchorCheckpoints", "rootsOf", "latestOf", "CheckpointAnchored"} <= names
    assert not {"record", "recordBatch", "digestsOf", "ExecutionRecorded"} & names
    legacy = json.loads((solc.CONTRACTS_DIR / "legacy" / "ExecutionLedgerV1.json").read_text())
    assert "recordBatch" in {item.get("name") for item in legacy["abi"]}  # the bench's per-record baseline


def test_check_command_reports_fresh_artifact():
    import subprocess
    import sys
    from pathlib import Path

    try:
        solc.find_solcjs()
    except solc.CompilerMissing as exc:
        pytest.skip(f"solcjs not installed: {exc}")
    if shutil.which("node") is None:
        pytest.skip("node is not installed: cannot run solcjs")
    proc = subprocess.run([sys.executable, "-m", "ledger.compile", "--check"], capture_output=True, text=True,
                          cwd=Path(solc.__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0 and "up to date" in proc.stdout
