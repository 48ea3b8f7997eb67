"""ChainWriter: anchors the journal's signed log checkpoints on chain (`anchorCheckpoints`).

Why checkpoints, not records (issue #12): every record is a leaf of the journal's
Merkle log; one (origin, size, root) on chain commits to every record below `size`, so
per-record gas tends to zero and anchoring keeps up with any ingest rate. A row is
`confirmed` once an anchored checkpoint covers its log index.

Why this shape (measured on anvil, docs/BENCHMARKS.md "Ledger"): a local nonce and fixed
fees, fast coincurve signing, gas from `eth_estimateGas` with a margin and never below
the EIP-7623 calldata floor, receipts always awaited with a timeout.

Recovery is keyed by checkpoint size: the contract keeps `recorder => origin => size =>
root` and skips an (size, root) this recorder already anchored, so re-sending is always
safe. When the chain looks different from what the journal remembers (genesis hash
changed, contract code gone, an anchoring block's hash changed or vanished) the writer
redeploys if needed and asks the contract (`rootsOf`) which checkpoints it still has;
the rest go back to pending and are re-sent AS STORED: a lost chain gets the same signed
history back, never a recomputed one.

Usage:
    writer = ChainWriter(journal, rpc_url, private_key)   # deploys/finds the contract
    writer.anchor_pending()                               # -> rows newly covered on chain
    writer.run(stop_event, interval=1.0)                  # loop until stop_event is set
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account
from eth_typing import ChecksumAddress
from eth_utils import to_checksum_address as to_checksum
from web3 import Web3
from web3.types import Wei

from kombu_mqtt.backoff import Backoff
from ledger import contract
from ledger.deploy import LedgerConfig, chain_identity, connect, ensure_deployed, fee_params, has_ledger_code
from ledger.journal import CONFIRMED, PENDING, SENT, Journal
from ledger.rpc import fast_signing, get_receipt, scan_events, send_raw, wait_receipt

log = logging.getLogger(__name__)

CONFLICT = "conflict"  # the chain holds another root for this size from us: audit reports it
ROOTS_CHUNK = 500
ZERO = b"\0" * 32


class ChainWriterError(RuntimeError):
    """A batch could not be anchored (the checkpoints stay pending and are retried)."""


@dataclass
class WriterStats:
    batches: int = 0
    confirmed: int = 0  # checkpoints confirmed
    resent: int = 0
    redeployed: int = 0
    reconciled: int = 0
    errors: int = 0
    last_error: str = ""
    started: float = field(default_factory=time.monotonic)


@dataclass
class _InFlight:
    sizes: list[int]
    tx_hash: bytes


def origin_of(note: str) -> str:
    """The origin line of a stored checkpoint note (its first line)."""
    return note.split("\n", 1)[0]


class ChainWriter:
    """ChainWriter(journal, rpc_url, private_key): one recorder account, one journal.

    rpc_url may be a URL string or a ready `Web3` (eth-tester in unit tests).
    max_batch: checkpoints per `anchorCheckpoints`; in_flight: transactions sent before
    waiting for receipts; receipt_timeout: seconds before a tx counts as lost.
    redeploy: deploy a new contract when the configured one is gone (local chains).
    """

    def __init__(
        self,
        journal: Journal,
        rpc_url: str | Web3,
        private_key: str,
        *,
        contract_address: str | None = None,
        max_batch: int = 100,
        in_flight: int = 4,
        receipt_timeout: float = 30.0,
        gas_margin: float = 1.2,
        redeploy: bool = True,
    ) -> None:
        self.journal = journal
        self.w3 = connect(rpc_url) if isinstance(rpc_url, str) else rpc_url
        self.account = Account.from_key(private_key)
        self._key = private_key
        self.max_batch = max(1, max_batch)
        self.in_flight = max(1, in_flight)
        self.receipt_timeout = receipt_timeout
        self.gas_margin = gas_margin
        self.redeploy = redeploy
        self.stats = WriterStats()
        self._gas_by_size: dict[int, int] = {}
        self._fees: dict[str, int] = {}
        self._nonce: int | None = None
        self.config: LedgerConfig | None = None
        self._explicit_contract = contract_address
        self._needs_check = True
        self._lock = threading.Lock()
        #: set to end `run`'s idle wait early: a new checkpoint to anchor, or stop
        self.wake = threading.Event()
        if not fast_signing():
            log.warning("coincurve is not installed: transaction signing is ~10x slower (pip install coincurve)")

    @property
    def address(self) -> ChecksumAddress:
        return self.account.address

    @property
    def contract_address(self) -> str:
        """The contract in use (checks the chain, deploying on first use)."""
        with self._lock:
            self._ensure_chain()
        assert self.config is not None
        return self.config.contract_address

    def _origin_key(self) -> bytes | None:
        first = self.journal.checkpoints(limit=1)
        return contract.origin_hash(origin_of(first[0]["note"])) if first else None

    # -- chain health -----------------------------------------------------------------
    def _ensure_chain(self) -> None:
        """Check the chain is the one the journal remembers; recover when it is not."""
        if not self._needs_check and self.config is not None:
            # Cheap probe each call: a restarted/wiped chain (or another writer with our key)
            # shows up as a pending nonce that differs from ours.
            if self.w3.eth.get_transaction_count(self.address, "pending") == self._nonce:
                return
            log.warning("account nonce on chain differs from the writer's: re-checking the chain")
        saved = self.config or LedgerConfig.load(self.journal)
        chain_id, genesis = chain_identity(self.w3)
        changed = saved is not None and (saved.chain_id != chain_id or saved.genesis_hash != genesis)
        address = self._explicit_contract or (saved.contract_address if saved else None)
        code_ok = address is not None and has_ledger_code(self.w3, address)
        if not code_ok and address is not None and not self.redeploy:
            raise ChainWriterError(f"no ExecutionLedger code at {address} on chain {chain_id}: "
                                   "deploy it (python -m ledger.deploy) or enable redeploy")
        if not code_ok:
            self.stats.redeployed += saved is not None
        self.config = ensure_deployed(self.journal, self.w3, self._key,
                                      contract_address=address if code_ok else None)
        self._explicit_contract = None  # from now on the journal's config names it (it may be redeployed)
        moved = saved is not None and to_checksum(self.config.contract_address) != to_checksum(saved.contract_address)
        lost_history = changed or moved or not code_ok or not self._confirmed_block_still_there()
        self._fees = fee_params(self.w3)
        self._nonce = self.w3.eth.get_transaction_count(self.address, "pending")
        self._gas_by_size.clear()
        if lost_history and saved is not None:
            log.warning("chain %s no longer matches the journal (chain id/genesis changed: %s, contract "
                        "missing: %s, contract moved: %s): reconciling against %s", chain_id, changed, not code_ok,
                        moved, self.config.contract_address)
            self.reconcile(states=(SENT, CONFIRMED, CONFLICT))
        self._resolve_sent()
        self._needs_check = False

    def _confirmed_block_still_there(self) -> bool:
        latest = self.journal.max_confirmed_checkpoint_block()
        if latest is None:
            return True
        number, block_hash = latest
        return self._block_hash(number) == block_hash

    def _block_hash(self, number: int | None) -> str | None:
        if number is None:
            return None
        try:
            return "0x" + bytes(self.w3.eth.get_block(number)["hash"]).hex()
        except Exception:  # noqa: BLE001 - BlockNotFound and RPC variants: the block is gone
            return None

    def _onchain_roots(self, origin_key: bytes, sizes: list[int]) -> list[bytes]:
        assert self.config is not None
        out: list[bytes] = []
        for i in range(0, len(sizes), ROOTS_CHUNK):
            data = contract.encode_roots_of(self.address, origin_key, sizes[i:i + ROOTS_CHUNK])
            out.extend(contract.decode_roots_of(bytes(self.w3.eth.call({"to": self.config.contract_address,
                                                                         "data": data}))))
        return out

    def reconcile(self, states: tuple[str, ...] = (SENT, CONFIRMED, CONFLICT)) -> dict[str, int]:
        """Ask the contract which stored checkpoints (in `states`) it holds; fix the journal to match.

        Returns counts: confirmed (on chain with the stored root), pending (missing, will be
        re-sent as stored), conflict (the chain holds another root from us for that size).
        """
        return self._reconcile(self.journal.checkpoints_in_state(*states))

    def _reconcile(self, rows: list[dict[str, Any]]) -> dict[str, int]:
        result = {"confirmed": 0, "pending": 0, "conflict": 0}
        origin_key = self._origin_key()
        if not rows or origin_key is None:
            return result
        onchain = self._onchain_roots(origin_key, [r["size"] for r in rows])
        missing, found, conflict = [], [], []
        for row, root in zip(rows, onchain, strict=False):
            if root == ZERO:
                missing.append(row["size"])
            elif root.hex() == row["root"]:
                found.append(row)
            else:
                conflict.append(row["size"])
        if missing:
            self.journal.checkpoints_reset(missing)
            self.stats.resent += len(missing)
        if conflict:
            self.journal.checkpoints_reset(conflict, CONFLICT)
            log.error("%d stored checkpoints disagree with the roots on chain: run `edge-audit verify`", len(conflict))
        self._confirm_found(found, origin_key)
        self.stats.reconciled += len(rows)
        result.update(confirmed=len(found), pending=len(missing), conflict=len(conflict))
        log.info("reconciled %d checkpoints: %s", len(rows), result)
        return result

    def _confirm_found(self, rows: list[dict[str, Any]], origin_key: bytes) -> None:
        """Checkpoints the contract has: keep their block if it still exists, else find their event."""
        assert self.config is not None
        stale = [r for r in rows if not (r["anchor_state"] == CONFIRMED and r["block_hash"]
                                         and self._block_hash(r["block_number"]) == r["block_hash"])]
        if not stale:
            return
        recorder_topic = "0x" + "00" * 12 + self.address[2:].lower()
        events = {e.size: e for e in scan_events(self.w3, self.config.contract_address,
                                                 [contract.CHECKPOINT_TOPIC, "0x" + origin_key.hex(), recorder_topic])}
        found = []
        for row in stale:
            event = events.get(row["size"])
            if event is not None:
                found.append((row["size"], event.block_number, event.block_hash, event.tx_hash))
        orphans = [r["size"] for r in stale if r["size"] not in events]
        if orphans:
            # State says anchored, history has no event (an inconsistent node snapshot):
            # it cannot be re-sent to this contract; park it for the auditor.
            log.error("%d checkpoints are anchored in %s's state but have no event (e.g. size %d): marked %s",
                      len(orphans), self.config.contract_address, orphans[0], CONFLICT)
            self.journal.checkpoints_reset(orphans, CONFLICT)
        self.journal.checkpoints_confirmed(found, self.config.chain_id, self.config.contract_address)

    def _resolve_sent(self) -> None:
        """Checkpoints left `sent` by an earlier run or a timeout: receipt if any, else ask the contract."""
        sent = self.journal.checkpoints_in_state(SENT)
        by_tx: dict[str, list[dict[str, Any]]] = {}
        for row in sent:
            by_tx.setdefault(row["tx_hash"], []).append(row)
        unresolved: list[dict[str, Any]] = []
        for tx_hash, rows in by_tx.items():
            receipt = get_receipt(self.w3, tx_hash) if tx_hash else None
            if receipt is None or contract.as_int(receipt["status"]) != 1:
                unresolved.extend(rows)
                continue
            self._apply_receipt(receipt, [r["size"] for r in rows])
        if unresolved:
            self._reconcile(unresolved)

    # -- sending ----------------------------------------------------------------------
    def anchor_pending(self, max_batch: int | None = None, limit: int | None = None) -> int:
        """Anchor pending checkpoints in batches until none are left (or `limit` were taken).

        Returns how many journal rows became covered by an anchored checkpoint. Raises on
        RPC failure (checkpoints stay pending or sent and are resolved on the next call).
        """
        with self._lock:
            try:
                self._ensure_chain()  # may send lost checkpoints back to pending
                before = self._covered()
                self._anchor(max_batch or self.max_batch, limit)
            except Exception as exc:
                self._needs_check = True
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                raise
            return self._covered() - before

    def _covered(self) -> int:
        latest = self.journal.latest_checkpoint(anchored=True)
        return latest["size"] if latest else 0

    def _anchor(self, batch_size: int, limit: int | None) -> None:
        taken = 0
        while limit is None or taken < limit:
            want = batch_size * self.in_flight if limit is None else min(batch_size * self.in_flight, limit - taken)
            rows = self.journal.checkpoints_in_state(PENDING, limit=want)
            if not rows:
                break
            taken += len(rows)
            origin_key = contract.origin_hash(origin_of(rows[0]["note"]))
            flights = [self._send_batch(origin_key, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
            assert self.config is not None
            self.journal.checkpoints_sent([(f.sizes, "0x" + f.tx_hash.hex()) for f in flights],
                                          self.config.chain_id, self.config.contract_address)
            batch: list[tuple[int, int, str, str]] = []
            try:
                for flight in flights:
                    self._await(flight, batch)
            finally:
                self.journal.checkpoints_confirmed(batch, self.config.chain_id, self.config.contract_address)

    def _send_batch(self, origin_key: bytes, rows: list[dict[str, Any]]) -> _InFlight:
        assert self.config is not None and self._nonce is not None
        sizes = [int(r["size"]) for r in rows]
        data = contract.encode_anchor_checkpoints(origin_key, sizes, [bytes.fromhex(r["root"]) for r in rows])
        tx = {"to": self.config.contract_address, "data": data, "value": 0, "chainId": self.config.chain_id,
              "nonce": self._nonce, "gas": self._gas_for(len(rows), data), "type": 2, **self._fees}
        signed = self.account.sign_transaction(tx)
        try:
            tx_hash = send_raw(self.w3, signed.raw_transaction)
        except Exception:
            self._needs_check = True
            raise
        self._nonce += 1
        self.stats.batches += 1
        return _InFlight(sizes=sizes, tx_hash=tx_hash)

    def _gas_for(self, size: int, data: bytes) -> int:
        """Estimated once per batch size (a fresh checkpoint costs the most), plus margin and floor."""
        assert self.config is not None
        gas = self._gas_by_size.get(size)
        if gas is None:
            try:
                estimate = self.w3.eth.estimate_gas({"from": self.address, "to": to_checksum(self.config.contract_address),
                                                     "data": data, "value": Wei(0)})
            except Exception:
                self._needs_check = True
                raise
            gas = int(estimate * self.gas_margin) + 20_000 + 30_000 * size
            self._gas_by_size[size] = gas
        return max(gas, int(contract.calldata_floor_gas(data) * 1.1))

    def _await(self, flight: _InFlight, batch: list[tuple[int, int, str, str]]) -> None:
        try:
            receipt = wait_receipt(self.w3, "0x" + flight.tx_hash.hex(), self.receipt_timeout)
        except TimeoutError as exc:
            self._needs_check = True
            raise ChainWriterError(f"no receipt for {flight.tx_hash.hex()} after {self.receipt_timeout}s: "
                                   "its checkpoints stay `sent` and are re-checked on the next run") from exc
        if contract.as_int(receipt["status"]) != 1:
            self._needs_check = True
            self.journal.checkpoints_reset(flight.sizes)
            raise ChainWriterError(f"anchorCheckpoints {flight.tx_hash.hex()} reverted: checkpoints returned to "
                                   "pending (a size at or below the latest anchored one? see `edge-audit verify`)")
        self._apply_receipt(receipt, flight.sizes, batch)

    def _apply_receipt(self, receipt: Any, sizes: list[int], batch: list[tuple[int, int, str, str]] | None = None
                       ) -> None:
        """Confirm checkpoints whose event is in this receipt; ones skipped as already anchored get checked."""
        assert self.config is not None
        block_hash = "0x" + contract.as_bytes(receipt["blockHash"]).hex()
        tx_hash = "0x" + contract.as_bytes(receipt["transactionHash"]).hex()
        number = contract.as_int(receipt["blockNumber"])
        contract_bytes = contract.as_bytes(self.config.contract_address)
        recorder = contract.as_bytes(self.address)
        wanted = set(sizes)
        found: list[tuple[int, int, str, str]] = []
        for raw in receipt["logs"]:
            if contract.as_bytes(raw["address"]) != contract_bytes:
                continue
            event = contract.decode_checkpoint_event(raw)
            if event is None or contract.as_bytes(event.recorder) != recorder or event.size not in wanted:
                continue
            found.append((event.size, number, block_hash, tx_hash))
        if batch is None:
            self.journal.checkpoints_confirmed(found, self.config.chain_id, self.config.contract_address)
        else:
            batch.extend(found)
        self.stats.confirmed += len(found)
        if len(found) != len(sizes):
            done = {f[0] for f in found}
            skipped = [s for s in sizes if s not in done]
            log.info("%d checkpoints were already on chain (re-sent after a timeout or restart)", len(skipped))
            self._reconcile(self.journal.checkpoints_of_sizes(skipped))

    # -- loop -------------------------------------------------------------------------
    def run(self, stop_event: threading.Event, interval: float = 1.0, progress_every: float = 30.0) -> None:
        """Anchor until stop_event is set; back off on errors (chain down), log progress."""
        backoff = Backoff(max(interval, 0.1), 30.0)  # chain outages: doubling up to 30 s, jittered
        last_progress = time.monotonic()
        while not stop_event.is_set():
            try:
                # bounded per call so a flood of checkpoints cannot delay stop or progress logs
                self.anchor_pending(limit=self.max_batch * self.in_flight * 10)
                pending = self.journal.checkpoint_counts()[PENDING]
                backoff.reset()
            except Exception as exc:  # noqa: BLE001 - the loop must survive chain outages
                delay = backoff.next()
                log.warning("chain writer: %s (retrying in %.1fs)", self.stats.last_error or exc, delay)
                stop_event.wait(delay)
                continue
            if time.monotonic() - last_progress >= progress_every:
                last_progress = time.monotonic()
                log.info("chain writer: %d checkpoints confirmed in %d batches; checkpoints %s, journal %s",
                         self.stats.confirmed, self.stats.batches, self.journal.checkpoint_counts(),
                         self.journal.counts())
            if not pending:
                # until a new checkpoint (Checkpointer.on_new sets `wake`) or `interval` passes
                self.wake.wait(interval)
                self.wake.clear()
