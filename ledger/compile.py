"""Compile ExecutionLedger.sol with the pinned npm solcjs into the committed artifact.

Why a committed artifact: the runtime never needs Node; `compile.py --check` (and a
test) recompiles and fails when ExecutionLedger.json no longer matches the source.
Usage: python -m ledger.compile [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .node_tools import find_node_tool

CONTRACTS_DIR = Path(__file__).resolve().parent / "contracts"
SOURCE = CONTRACTS_DIR / "ExecutionLedger.sol"
ARTIFACT = CONTRACTS_DIR / "ExecutionLedger.json"
CONTRACT_NAME = "ExecutionLedger"
SOLC_VERSION = "0.8.30"
EVM_VERSION = "cancun"
OPTIMIZER_RUNS = 200


class CompilerMissing(RuntimeError):
    """solcjs (npm `solc`) is not installed."""


class CompileError(RuntimeError):
    """solc reported errors."""


def find_solcjs() -> str:
    """EDGE_SOLCJS_BIN, else node_modules/.bin/solcjs of this repo, else solcjs on PATH."""
    return find_node_tool("solcjs", "EDGE_SOLCJS_BIN", CompilerMissing, "installs solc 0.8.30")


def standard_json_input(source: str) -> dict:
    return {
        "language": "Solidity",
        "sources": {SOURCE.name: {"content": source}},
        "settings": {
            "evmVersion": EVM_VERSION,
            "optimizer": {"enabled": True, "runs": OPTIMIZER_RUNS},
            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
        },
    }


def compile_artifact(solcjs: str | None = None) -> dict:
    """Run solcjs --standard-json and return the artifact dict (abi, bytecode, settings)."""
    source = SOURCE.read_text()
    solcjs = solcjs or find_solcjs()
    if shutil.which("node") is None and not os.environ.get("EDGE_SOLCJS_BIN"):
        raise CompilerMissing("node is not installed: install Node.js >= 18, then `npm ci`")
    proc = subprocess.run(
        [solcjs, "--standard-json"],
        input=json.dumps(standard_json_input(source)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise CompileError(f"solcjs failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    # solcjs may print a warning line before the JSON document.
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    errors = [e for e in out.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise CompileError("; ".join(e.get("formattedMessage", e.get("message", "?")).strip() for e in errors))
    contract = out["contracts"][SOURCE.name][CONTRACT_NAME]
    return {
        "contractName": CONTRACT_NAME,
        "compiler": f"solc {SOLC_VERSION}",
        "evmVersion": EVM_VERSION,
        "optimizer": {"enabled": True, "runs": OPTIMIZER_RUNS},
        "sourceSha256": hashlib.sha256(source.encode()).hexdigest(),
        "abi": contract["abi"],
        "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
        "deployedBytecode": "0x" + contract["evm"]["deployedBytecode"]["object"],
    }


def render(artifact: dict) -> str:
    return json.dumps(artifact, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ledger.compile", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed artifact is stale")
    args = parser.parse_args(argv)
    try:
        text = render(compile_artifact())
    except (CompilerMissing, CompileError) as exc:
        print(f"compile: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = ARTIFACT.read_text() if ARTIFACT.exists() else ""
        if current != text:
            print(f"compile: {ARTIFACT} is stale: run `python -m ledger.compile` and commit it", file=sys.stderr)
            return 1
        print("compile: artifact is up to date")
        return 0
    ARTIFACT.write_text(text)
    print(f"compile: wrote {ARTIFACT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
