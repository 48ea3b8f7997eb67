"""The committed ExecutionLedger artifact and the few encodings the writer and audit need.

The contract anchors transparency-log checkpoints (`anchorCheckpoints`, event
`CheckpointAnchored`). The per-record `recordBatch` encodings below belong to the
legacy artifact (contracts/legacy/ExecutionLedgerV1.json) that bench/ledger.py keeps
as the baseline; nothing else uses them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from eth_abi import decode, encode
from eth_utils import keccak, to_checksum_address

ARTIFACT_PATH = Path(__file__).resolve().parent / "contracts" / "ExecutionLedger.json"
LEGACY_ARTIFACT_PATH = Path(__file__).resolve().parent / "contracts" / "legacy" / "ExecutionLedgerV1.json"

ANCHOR_SIG = "anchorCheckpoint(bytes32,uint64,bytes32)"
ANCHOR_BATCH_SIG = "anchorCheckpoints(bytes32,uint64[],bytes32[])"
ROOTS_OF_SIG = "rootsOf(address,bytes32,uint64[])"
CHECKPOINT_EVENT_SIG = "CheckpointAnchored(bytes32,address,uint64,bytes32)"
CHECKPOINT_TOPIC = keccak(text=CHECKPOINT_EVENT_SIG)

RECORD_BATCH_SIG = "recordBatch(bytes32[],bytes32[],bytes32[],uint8[],uint64[])"


@lru_cache(maxsize=1)
def artifact() -> dict[str, Any]:
    return json.loads(ARTIFACT_PATH.read_text())


def abi() -> list[dict[str, Any]]:
    return artifact()["abi"]


def bytecode() -> str:
    return artifact()["bytecode"]


def deployed_bytecode() -> bytes:
    return bytes.fromhex(artifact()["deployedBytecode"][2:])


def legacy_artifact() -> dict[str, Any]:
    """The per-record contract (recordBatch) the checkpoint design replaced: the bench's baseline."""
    return json.loads(LEGACY_ARTIFACT_PATH.read_text())


def _selector(sig: str) -> bytes:
    return keccak(text=sig)[:4]


def origin_hash(origin: str) -> bytes:
    """bytes32 on-chain key of a log: sha256 of its origin line (UTF-8)."""
    return hashlib.sha256(origin.encode("utf-8")).digest()


def encode_anchor_checkpoints(origin_key: bytes, sizes: list[int], roots: list[bytes]) -> bytes:
    return _selector(ANCHOR_BATCH_SIG) + encode(["bytes32", "uint64[]", "bytes32[]"], [origin_key, sizes, roots])


def encode_anchor_checkpoint(origin_key: bytes, size: int, root: bytes) -> bytes:
    return _selector(ANCHOR_SIG) + encode(["bytes32", "uint64", "bytes32"], [origin_key, size, root])


def encode_roots_of(recorder: str, origin_key: bytes, sizes: list[int]) -> bytes:
    return _selector(ROOTS_OF_SIG) + encode(["address", "bytes32", "uint64[]"], [recorder, origin_key, sizes])


def decode_roots_of(data: bytes) -> list[bytes]:
    (out,) = decode(["bytes32[]"], data)
    return list(out)


@dataclass(frozen=True)
class CheckpointEvent:
    """One CheckpointAnchored log, decoded."""

    origin_key: bytes
    recorder: str
    size: int
    root: bytes
    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int


def decode_checkpoint_event(log: Any) -> CheckpointEvent | None:
    """Decode a raw log; None if it is not CheckpointAnchored."""
    topics = [_bytes(t) for t in log["topics"]]
    if len(topics) != 4 or topics[0] != CHECKPOINT_TOPIC:
        return None
    data = _bytes(log["data"])
    if len(data) != 32:
        return None
    return CheckpointEvent(
        origin_key=topics[1], recorder=_checksum(topics[2][12:]), size=int.from_bytes(topics[3], "big"),
        root=data, block_number=as_int(log["blockNumber"]), block_hash=_hex(log["blockHash"]),
        tx_hash=_hex(log["transactionHash"]), log_index=as_int(log["logIndex"]))


def encode_record_batch_reference(task_keys: list[bytes], agent_keys: list[bytes], digests: list[bytes],
                                  statuses: list[int], finished_ms: list[int]) -> bytes:
    """The same encoding through eth_abi (tests compare the two)."""
    return _selector(RECORD_BATCH_SIG) + encode(
        ["bytes32[]", "bytes32[]", "bytes32[]", "uint8[]", "uint64[]"],
        [task_keys, agent_keys, digests, statuses, finished_ms])


_RECORD_BATCH_SELECTOR = keccak(text=RECORD_BATCH_SIG)[:4]


def encode_record_batch(task_keys: list[bytes], agent_keys: list[bytes], digests: list[bytes],
                        statuses: list[int], finished_ms: list[int]) -> bytes:
    """ABI-encode recordBatch by hand: five dynamic arrays of 32-byte words (eth_abi is 20x slower).

    Equal lengths are required here; the contract also rejects unequal ones.
    """
    columns = (task_keys, agent_keys, digests, statuses, finished_ms)
    n = len(task_keys)
    if any(len(c) != n for c in columns):
        return _selector(RECORD_BATCH_SIG) + encode(
            ["bytes32[]", "bytes32[]", "bytes32[]", "uint8[]", "uint64[]"], list(columns))
    for word in (*task_keys, *agent_keys, *digests):
        if len(word) != 32:
            raise ValueError("recordBatch keys and digests must be 32 bytes each")
    for value in statuses:
        if not 0 <= value < 256:
            raise ValueError(f"status {value} does not fit uint8")
    for value in finished_ms:
        if not 0 <= value < 2**64:
            raise ValueError(f"timestamp {value} does not fit uint64")
    size = 32 * (1 + n)
    parts = [_RECORD_BATCH_SELECTOR]
    parts.extend((160 + k * size).to_bytes(32, "big") for k in range(5))
    length = n.to_bytes(32, "big")
    for words in (task_keys, agent_keys, digests):
        parts.append(length)
        parts.extend(words)
    for numbers in (statuses, finished_ms):
        parts.append(length)
        parts.extend(v.to_bytes(32, "big") for v in numbers)
    return b"".join(parts)


def as_int(value: Any) -> int:
    """JSON-RPC quantities arrive as hex strings (HTTP) or ints (eth-tester)."""
    return int(value, 16) if isinstance(value, str) else int(value)


def _hex(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    return str(value) if str(value).startswith("0x") else "0x" + str(value)


def as_bytes(value: Any) -> bytes:
    return _bytes(value)


def _bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    text = str(value)
    return bytes.fromhex(text[2:] if text.startswith("0x") else text)


@lru_cache(maxsize=1024)
def _checksum(address: bytes) -> str:
    return to_checksum_address(address)  # costly; recorders are few


def calldata_floor_gas(data: bytes) -> int:
    """EIP-7623 floor: 21000 + 10 * tokens (zero byte = 1 token, non-zero = 4).

    A transaction whose gas limit is below this is invalid on Prague chains.
    """
    zeros = data.count(0)
    return 21_000 + 10 * (zeros + 4 * (len(data) - zeros))
