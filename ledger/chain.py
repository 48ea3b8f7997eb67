"""Alias kept for docs/INTERFACES.md's first draft: the managed chain lives in ledger.anvil."""

from ledger.anvil import AnvilError, ManagedAnvil

__all__ = ["AnvilError", "ManagedAnvil"]
