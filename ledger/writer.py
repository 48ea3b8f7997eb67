"""ChainWriter: anchors pending journal rows on chain with `recordBatch` transactions.

Why this shape (measured on anvil, docs/BENCHMARKS.md "Ledger"): a local nonce and fixed
fees (`build_transaction` per tx cuts throughput to ~140 tx/s), fast coincurve signing, gas from `eth_estimateGas` with a margin
and never below the EIP-7623 calldata floor (a tx under the floor is accepted then
silently dropped), receipts always awaited with a timeout.

Recovery is keyed by taskId: the contract keeps `recorder => taskId => digest` and skips
a taskId this recorder already recorded, so re-sending is always safe. When the chain
looks different from what the journal remembers (genesis hash changed, contract code
gone, a confirmed block's hash changed or vanished) the writer redeploys if needed and
asks the contract (`digestsOf`) which rows it still has; the rest go back to pending.

Usage:
    writer = ChainWriter(journal, rpc_url, private_key)   # deploys/finds the contract
    writer.anchor_pending()                               # -> records confirmed
    writer.run(stop_event, interval=1.0)                  # loop until stop_event is set
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account
from eth_utils import to_checksum_address as to_checksum
from web3 import Web3

from ledger import contract
from ledger.deploy import LedgerConfig, chain_identity, connect, ensure_deployed, fee_params, has_ledger_code
from ledger.journal import CONFIRMED, SENT, Journal
from ledger.record import ExecutionRecord
from ledger.rpc import fast_signing, get_receipt, scan_events, send_raw, wait_receipt

log = logging.getLogger(__name__)

CONFLICT = "conflict"  # the chain holds another digest for this taskId from us: audit reports it
DIGESTS_CHUNK = 500


class ChainWriterError(RuntimeError):
    """A batch could not be anchored (the rows stay pending and are retried)."""


@dataclass
class WriterStats:
    batches: int = 0
    confirmed: int = 0
    resent: int = 0
    redeployed: int = 0
    reconciled: int = 0
    errors: int = 0
    last_error: str = ""
    started: float = field(default_factory=time.monotonic)


@dataclass
class _InFlight:
    task_ids: list[str]
    task_keys: dict[bytes, str]
    tx_hash: bytes


class ChainWriter:
    """ChainWriter(journal, rpc_url, private_key): one recorder account, one journal.

    rpc_url may be a URL string or a ready `Web3` (eth-tester in unit tests).
    max_batch: records per `recordBatch`; in_flight: transactions sent before waiting
    for receipts; receipt_timeout: seconds before a tx counts as lost.
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
        self._rpc = rpc_url
        self.account = Account.from_key(private_key)
        self._key = private_key
        self.max_batch = max_batch
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
        if not fast_signing():
            log.warning("coincurve is not installed: transaction signing is ~10x slower (pip install coincurve)")

    @property
    def address(self) -> str:
        return self.account.address

    @property
    def contract_address(self) -> str:
        """The contract in use (checks the chain, deploying on first use)."""
        with self._lock:
            self._ensure_chain()
        assert self.config is not None
        return self.config.contract_address

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
        latest = self.journal.max_confirmed_block()
        if latest is None:
            return True
        number, block_hash = latest
        try:
            block = self.w3.eth.get_block(number)
        except Exception:  # noqa: BLE001 - BlockNotFound and RPC variants: the block is gone
            return False
        return "0x" + bytes(block["hash"]).hex() == block_hash

    def _onchain_digests(self, task_keys: list[bytes]) -> list[bytes]:
        assert self.config is not None
        out: list[bytes] = []
        for i in range(0, len(task_keys), DIGESTS_CHUNK):
            chunk = task_keys[i:i + DIGESTS_CHUNK]
            data = contract.encode_digests_of(self.address, chunk)
            raw = self.w3.eth.call({"to": self.config.contract_address, "data": data})
            out.extend(contract.decode_digests_of(bytes(raw)))
        return out

    def reconcile(self, states: tuple[str, ...] = (SENT, CONFIRMED, CONFLICT)) -> dict[str, int]:
        """Ask the contract which rows (in `states`) it holds; fix the journal to match.

        Returns counts: confirmed (on chain with the journal's digest), pending (missing,
        will be re-sent), conflict (chain holds another digest from us for that taskId).
        """
        placeholders = ",".join("?" * len(states))
        return self._reconcile_rows(list(self.journal.rows(f"anchor_state IN ({placeholders})", states)))

    def _reconcile_rows(self, rows: list[dict[str, Any]]) -> dict[str, int]:
        result = {"confirmed": 0, "pending": 0, "conflict": 0}
        if not rows:
            return result
        keys = [ExecutionRecord.from_mapping(r).task_key for r in rows]
        onchain = self._onchain_digests(keys)
        missing, found, conflict = [], [], []
        for row, digest in zip(rows, onchain):
            if digest == b"\0" * 32:
                missing.append(row["task_id"])
            elif digest.hex() == row["digest"]:
                found.append(row)
            else:
                conflict.append(row["task_id"])
        if missing:
            self.journal.mark_pending(missing)
            self.stats.resent += len(missing)
        self._confirm_found(found)
        if conflict:
            self.journal.mark_state(conflict, CONFLICT)
            log.error("%d journal rows disagree with their on-chain digest: run `edge-audit verify`", len(conflict))
        self.stats.reconciled += len(rows)
        result.update(confirmed=len(found), pending=len(missing), conflict=len(conflict))
        log.info("reconciled %d rows: %s", len(rows), result)
        return result

    def _confirm_found(self, rows: list[dict[str, Any]]) -> None:
        """Rows the contract has: keep their block if it still exists, else find their event."""
        if not rows:
            return
        assert self.config is not None
        hashes: dict[int, str | None] = {}
        stale: list[dict[str, Any]] = []
        for row in rows:
            number = row["block_number"]
            if row["anchor_state"] == CONFIRMED and row["block_hash"] and number is not None:
                if number not in hashes:
                    hashes[number] = self._block_hash(number)
                if hashes[number] == row["block_hash"]:
                    continue
            stale.append(row)
        if not stale:
            return
        events = self._my_events()
        updates = []
        orphans = []
        for row in stale:
            event = events.get(ExecutionRecord.from_mapping(row).task_key)
            if event is None:
                orphans.append(row["task_id"])
            else:
                updates.append((event.block_number, event.block_hash, event.tx_hash, row["task_id"]))
        if orphans:
            # State says recorded, history has no event (an inconsistent node snapshot):
            # it cannot be re-sent to this contract; park it for the auditor.
            log.error("%d tasks are recorded in %s's state but have no event (e.g. %s): marked %s; "
                      "`edge-audit verify` reports them", len(orphans), self.config.contract_address,
                      orphans[0], CONFLICT)
        self.journal.mark_found(updates, self.config.chain_id, self.config.contract_address, orphans, CONFLICT)

    def _block_hash(self, number: int | None) -> str | None:
        if number is None:
            return None
        try:
            return "0x" + bytes(self.w3.eth.get_block(number)["hash"]).hex()
        except Exception:  # noqa: BLE001 - missing block
            return None

    def _my_events(self) -> dict[bytes, contract.ChainEvent]:
        """This recorder's events on the contract, by taskId key (first one wins)."""
        assert self.config is not None
        recorder_topic = "0x" + "00" * 12 + self.address[2:].lower()
        out: dict[bytes, contract.ChainEvent] = {}
        for event in scan_events(self.w3, self.config.contract_address,
                                 [contract.EVENT_TOPIC, None, None, recorder_topic]):
            out.setdefault(event.task_key, event)
        return out

    def _resolve_sent(self) -> None:
        """Rows left `sent` by an earlier run or a timeout: receipt if any, else ask the contract."""
        sent = list(self.journal.rows("anchor_state = ?", (SENT,)))
        if not sent:
            return
        by_tx: dict[str, list[dict[str, Any]]] = {}
        for row in sent:
            by_tx.setdefault(row["tx_hash"], []).append(row)
        unresolved: list[dict[str, Any]] = []
        for tx_hash, rows in by_tx.items():
            receipt = get_receipt(self.w3, tx_hash) if tx_hash else None
            if receipt is None or contract.as_int(receipt["status"]) != 1:
                unresolved.extend(rows)
                continue
            self._apply_receipt(receipt, {ExecutionRecord.from_mapping(r).task_key: r["task_id"] for r in rows})
        if unresolved:
            keys = [ExecutionRecord.from_mapping(r).task_key for r in unresolved]
            onchain = self._onchain_digests(keys)
            missing = [r["task_id"] for r, d in zip(unresolved, onchain) if d == b"\0" * 32]
            self.journal.mark_pending(missing)
            self.stats.resent += len(missing)
            self._confirm_found([r for r, d in zip(unresolved, onchain) if d.hex() == r["digest"]])

    # -- sending ----------------------------------------------------------------------
    def anchor_pending(self, max_batch: int | None = None, limit: int | None = None) -> int:
        """Anchor pending rows in batches until none are left (or `limit` rows were taken).

        Returns how many rows were confirmed. Raises on RPC failure (rows stay pending or
        sent and are resolved on the next call).
        """
        with self._lock:
            try:
                return self._anchor(max_batch or self.max_batch, limit)
            except Exception as exc:
                self._needs_check = True
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                raise

    def _anchor(self, batch_size: int, limit: int | None) -> int:
        self._ensure_chain()
        confirmed = 0
        taken = 0
        while limit is None or taken < limit:
            flights: list[_InFlight] = []
            want = batch_size * self.in_flight if limit is None else min(batch_size * self.in_flight, limit - taken)
            rows = self.journal.pending(want)
            if not rows:
                break
            taken += len(rows)
            for i in range(0, len(rows), batch_size):
                flights.append(self._send_batch(rows[i:i + batch_size]))
            assert self.config is not None
            self.journal.mark_sent_if_pending([(f.task_ids, "0x" + f.tx_hash.hex()) for f in flights],
                                              self.config.chain_id, self.config.contract_address)
            batch: list[tuple[list[str], int, str, str]] = []
            try:
                for flight in flights:
                    confirmed += self._await(flight, batch)
            finally:
                self.journal.mark_confirmed_many(batch)  # one commit per round, even on error
        return confirmed

    def _send_batch(self, rows: list[dict[str, Any]]) -> _InFlight:
        assert self.config is not None and self._nonce is not None
        records = [ExecutionRecord.from_mapping(r) for r in rows]
        task_keys = [r.task_key for r in records]
        data = contract.encode_record_batch(
            task_keys, [r.agent_key for r in records], [bytes.fromhex(row["digest"]) for row in rows],
            [r.status_code for r in records], [r.finished_at_ms for r in records])
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
        return _InFlight(task_ids=[r.task_id for r in records], task_keys=dict(zip(task_keys, (r.task_id for r in records))),
                         tx_hash=tx_hash)

    def _gas_for(self, size: int, data: bytes) -> int:
        """Estimated once per batch size (all-new records cost the most), plus margin and floor."""
        assert self.config is not None
        gas = self._gas_by_size.get(size)
        if gas is None:
            estimate = self.w3.eth.estimate_gas({"from": self.address, "to": self.config.contract_address,
                                                 "data": data, "value": 0})
            gas = int(estimate * self.gas_margin) + 20_000
            self._gas_by_size[size] = gas
        return max(gas, int(contract.calldata_floor_gas(data) * 1.1))

    def _await(self, flight: _InFlight, batch: list[tuple[list[str], int, str, str]] | None = None) -> int:
        try:
            receipt = wait_receipt(self.w3, "0x" + flight.tx_hash.hex(), self.receipt_timeout)
        except TimeoutError as exc:
            self._needs_check = True
            raise ChainWriterError(f"no receipt for {flight.tx_hash.hex()} after {self.receipt_timeout}s: "
                                   "its rows stay `sent` and are re-checked on the next run") from exc
        if contract.as_int(receipt["status"]) != 1:
            self._needs_check = True
            self.journal.mark_pending(flight.task_ids)
            raise ChainWriterError(f"recordBatch {flight.tx_hash.hex()} reverted: rows returned to pending")
        return self._apply_receipt(receipt, flight.task_keys, batch)

    def _apply_receipt(self, receipt: Any, task_keys: dict[bytes, str],
                       batch: list[tuple[list[str], int, str, str]] | None = None) -> int:
        """Confirm rows whose event is in this receipt; rows skipped as duplicates get checked.

        With `batch`, the confirmation is queued there for one journal commit per round.
        """
        assert self.config is not None
        block_hash = "0x" + contract.as_bytes(receipt["blockHash"]).hex()
        tx_hash = "0x" + contract.as_bytes(receipt["transactionHash"]).hex()
        recorded: list[str] = []
        contract_bytes = contract.as_bytes(self.config.contract_address)
        recorder_topic = b"\0" * 12 + contract.as_bytes(self.address)
        for raw in receipt["logs"]:
            topics = raw["topics"]
            if len(topics) != 4 or contract.as_bytes(raw["address"]) != contract_bytes:
                continue
            if contract.as_bytes(topics[0]) != contract.EVENT_TOPIC or contract.as_bytes(topics[3]) != recorder_topic:
                continue
            task_id = task_keys.get(contract.as_bytes(topics[1]))
            if task_id is not None:
                recorded.append(task_id)
        confirmation = (recorded, contract.as_int(receipt["blockNumber"]), block_hash, tx_hash)
        if batch is None:
            self.journal.mark_confirmed_many([confirmation])
        else:
            batch.append(confirmation)
        self.stats.confirmed += len(recorded)
        if len(recorded) != len(task_keys):
            done = set(recorded)
            skipped = [t for t in task_keys.values() if t not in done]
            log.info("%d rows were already on chain (re-sent after a timeout or restart)", len(skipped))
            self._reconcile_rows([r for t in skipped if (r := self.journal.get(t)) is not None])
        return len(task_keys)

    # -- loop -------------------------------------------------------------------------
    def run(self, stop_event: threading.Event, interval: float = 1.0, progress_every: float = 30.0) -> None:
        """Anchor until stop_event is set; back off on errors (chain down), log progress."""
        first_backoff = max(interval, 0.1)
        backoff = first_backoff
        last_progress = time.monotonic()
        while not stop_event.is_set():
            try:
                # bounded per call so a flood of new rows cannot delay stop or progress logs
                done = self.anchor_pending(limit=self.max_batch * self.in_flight * 10)
                backoff = first_backoff
            except Exception as exc:  # noqa: BLE001 - the loop must survive chain outages
                log.warning("chain writer: %s (retrying in %.1fs)", self.stats.last_error or exc, backoff)
                stop_event.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if time.monotonic() - last_progress >= progress_every:
                last_progress = time.monotonic()
                counts = self.journal.counts()
                log.info("chain writer: %d confirmed in %d batches; journal %s", self.stats.confirmed,
                         self.stats.batches, counts)
            if not done:
                stop_event.wait(interval)
