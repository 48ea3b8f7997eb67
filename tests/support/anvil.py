"""A real anvil for tests, via ledger.anvil.ManagedAnvil (free loopback port, own state dir).

The session fixture `anvil` (tests/conftest.py) yields the ManagedAnvil: `.rpc_url`,
`.private_keys` / `.addresses` (10 funded dev accounts; `.dev_key` is the first),
`.chain_id`. Tests that kill or wipe the chain must start their own with `start_anvil`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ledger.anvil import ManagedAnvil


@contextmanager
def start_anvil(workdir: Path, **kwargs) -> Iterator[ManagedAnvil]:
    """A ManagedAnvil with snapshots in workdir/state; always stopped on exit."""
    kwargs.setdefault("accounts", 10)
    chain = ManagedAnvil(state_dir=workdir / "state", **kwargs)
    chain.start()
    try:
        yield chain
    finally:
        chain.stop(snapshot=False)
