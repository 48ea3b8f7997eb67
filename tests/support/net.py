"""Loopback helpers for tests: every server a test starts listens on 127.0.0.1.

The mechanism is the product's (ledger.processes); this adapter only raises instead of
returning False, which is what a test wants.
"""

from __future__ import annotations

from ledger import processes
from ledger.processes import free_port

__all__ = ["free_port", "wait_for_port"]


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on host:port, or raise TimeoutError."""
    if not processes.wait_for_port(port, timeout, host=host):
        raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
