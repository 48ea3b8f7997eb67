"""Locating the pinned npm tools (anvil, solcjs) the ledger runs.

Why one place: both tools come from this repository's `npm ci`; an operator may
point at another build with an environment variable, or rely on PATH.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO_BIN = Path(__file__).resolve().parent.parent / "node_modules" / ".bin"


def find_node_tool(name: str, env_var: str, error: type[Exception], install_hint: str) -> str:
    """`env_var` if set (must be executable), else node_modules/.bin/`name`, else PATH.

    Raises `error` naming the fix when the tool is nowhere.
    """
    env = os.environ.get(env_var)
    if env:
        if not os.access(env, os.X_OK):
            raise error(f"{env_var}={env} is not an executable file: fix the path or unset it")
        return env
    local = REPO_BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise error(f"{name} not found: run `npm ci` in the repository root ({install_hint})")
