"""Raw JSON-RPC helpers for the hot paths (receipts with 100 logs, long log scans).

Why: web3's result formatters (checksumming every address, AttributeDicts) cost more
than the chain itself on big receipts and log ranges. Over HTTP these helpers return
the raw JSON; on other providers (eth-tester in unit tests) they fall back to web3's
formatted calls. `contract.as_int` / `as_bytes` read either shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from web3 import HTTPProvider, Web3
from web3.exceptions import TransactionNotFound

from kombu_mqtt.backoff import Backoff
from ledger import contract


class RpcError(RuntimeError):
    """The node answered a JSON-RPC call with an error."""


def fast_signing() -> bool:
    """True when eth-keys signs through coincurve (libsecp256k1), ~10x faster than pure Python."""
    from eth_keys.backends import get_backend

    return type(get_backend()).__name__ == "CoinCurveECCBackend"


def raw_rpc(w3: Web3, method: str, params: list[Any]) -> Any:
    """A JSON-RPC call without web3's result formatters (10x cheaper for 100-log receipts)."""
    reply = w3.provider.make_request(method, params)  # type: ignore[arg-type]
    if reply.get("error"):
        raise RpcError(f"{method} failed: {reply['error']}")
    return reply.get("result")


def get_receipt(w3: Web3, tx_hash: str) -> Any:
    """The receipt or None; raw JSON over HTTP, web3-formatted on other providers (eth-tester)."""
    if isinstance(w3.provider, HTTPProvider):
        return raw_rpc(w3, "eth_getTransactionReceipt", [tx_hash])
    try:
        return w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
    except TransactionNotFound:
        return None


def send_raw(w3: Web3, raw: bytes) -> bytes:
    if isinstance(w3.provider, HTTPProvider):
        return contract.as_bytes(raw_rpc(w3, "eth_sendRawTransaction", ["0x" + raw.hex()]))
    return bytes(w3.eth.send_raw_transaction(raw))


def wait_receipt(w3: Web3, tx_hash: str, timeout: float, poll: float = 0.002) -> Any:
    """Poll for the receipt until it exists; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    polls = Backoff(poll, 0.1, factor=1.5, jitter=False)  # a poll, not a retry: no jitter
    while True:
        receipt = get_receipt(w3, tx_hash)
        if receipt is not None:
            return receipt
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no receipt for {tx_hash} after {timeout}s")
        time.sleep(polls.next())


def get_logs(w3: Web3, params: dict[str, Any]) -> list[Any]:
    """eth_getLogs; raw over HTTP (block numbers must be ints)."""
    if isinstance(w3.provider, HTTPProvider):
        raw = dict(params)
        for key in ("fromBlock", "toBlock"):
            if isinstance(raw.get(key), int):
                raw[key] = hex(raw[key])
        raw["topics"] = [t if t is None or isinstance(t, str) else "0x" + bytes(t).hex() for t in raw.get("topics", [])]
        return raw_rpc(w3, "eth_getLogs", [raw]) or []
    return list(w3.eth.get_logs(params))  # type: ignore[arg-type]


LOG_CHUNK = 5_000  # blocks per eth_getLogs call: nodes cap the range or the result size


def scan_events(w3: Web3, address: str, topics: list[Any], from_block: int = 0, to_block: int | None = None,
                chunk: int = LOG_CHUNK, progress: Callable[[int, int], None] | None = None,
                decoder: Callable[[Any], Any] = contract.decode_checkpoint_event) -> Iterator[Any]:
    """Decoded events of `address` matching `topics` (CheckpointAnchored by default), oldest
    first, read in block ranges of `chunk`; `progress(done_block, last_block)` after each range."""
    last = w3.eth.block_number if to_block is None else to_block
    start = from_block
    while start <= last:
        end = min(start + chunk - 1, last)
        for raw in get_logs(w3, {"address": address, "fromBlock": start, "toBlock": end, "topics": topics}):
            event = decoder(raw)
            if event is not None:
                yield event
        if progress is not None:
            progress(end, last)
        start = end + 1
