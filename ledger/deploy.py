"""Deploy ExecutionLedger and remember where it lives (in the journal's ledger_config table).

Why deterministic: deploying from the same key at nonce 0 gives the same address, so a
wiped local chain gets its contract back where the journal expects it.
Usage from code: `config = ensure_deployed(journal, rpc_url, private_key)`.
CLI: `python -m ledger.deploy --journal PATH --rpc-url URL --key 0x...` (or EDGE_LEDGER_KEY).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, cast

import requests
import rlp
from eth_account import Account
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.types import TxParams

from ledger import contract
from ledger.journal import Journal

log = logging.getLogger(__name__)

GWEI = 10**9


class DeployError(RuntimeError):
    """The contract could not be deployed or found."""


@dataclass(frozen=True)
class LedgerConfig:
    """Where the journal anchors: persisted as key/value rows in ledger_config."""

    rpc_url: str
    contract_address: str
    chain_id: int
    genesis_hash: str
    recorder: str

    @classmethod
    def load(cls, journal: Journal) -> LedgerConfig | None:
        values = journal.get_config()
        try:
            return cls(rpc_url=values["rpc_url"], contract_address=values["contract_address"],
                       chain_id=int(values["chain_id"]), genesis_hash=values["genesis_hash"],
                       recorder=values["recorder"])
        except KeyError:
            return None

    def save(self, journal: Journal) -> None:
        recorders = set(filter(None, journal.get_config().get("recorders", "").split(",")))
        recorders.add(self.recorder)
        journal.set_config(**asdict(self), recorders=",".join(sorted(recorders)))


def connect(rpc_url: str, timeout: float = 30.0) -> Web3:
    """A Web3 over HTTP with a request timeout and a keep-alive session.

    trust_env=False: no proxy/netrc lookups per request (a measurable cost per batch,
    and a loopback chain must never go through a proxy).
    """
    session = requests.Session()
    session.trust_env = False
    return Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}, session=session))


def rpc_url_of(w3: Web3) -> str:
    return getattr(w3.provider, "endpoint_uri", None) or type(w3.provider).__name__


def chain_identity(w3: Web3) -> tuple[int, str]:
    """(chain id, genesis block hash): changes when the chain was replaced or wiped."""
    return int(w3.eth.chain_id), "0x" + bytes(w3.eth.get_block(0)["hash"]).hex()


def fee_params(w3: Web3, tip_gwei: float = 1.0) -> dict[str, int]:
    """Fixed EIP-1559 fees: twice the current base fee plus a tip, enough for many blocks."""
    base = int(w3.eth.get_block("latest").get("baseFeePerGas") or GWEI)
    tip = int(tip_gwei * GWEI)
    return {"maxFeePerGas": max(2 * base, 2 * GWEI) + tip, "maxPriorityFeePerGas": tip}


def has_ledger_code(w3: Web3, address: str) -> bool:
    return bytes(w3.eth.get_code(to_checksum_address(address))) == contract.deployed_bytecode()


def deploy_contract(w3: Web3, private_key: str, timeout: float = 60.0) -> str:
    """Deploy a new ExecutionLedger from `private_key`; returns its checksum address."""
    account = Account.from_key(private_key)
    nonce = w3.eth.get_transaction_count(account.address, "pending")
    data = bytes.fromhex(contract.bytecode()[2:])
    tx: dict[str, Any] = {"from": account.address, "data": data, "nonce": nonce, "chainId": w3.eth.chain_id, "value": 0}
    gas = max(int(w3.eth.estimate_gas(cast(TxParams, tx)) * 1.25), contract.calldata_floor_gas(data) + 60_000)
    tx.update(gas=gas, type=2, **fee_params(w3))
    tx.pop("from")
    signed = account.sign_transaction(tx)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout, poll_latency=0.05)
    created = receipt.get("contractAddress")
    if receipt["status"] != 1 or not created:
        raise DeployError(f"deployment transaction {tx_hash.hex()} reverted: check the account's balance")
    address = to_checksum_address(created)
    log.info("deployed ExecutionLedger at %s (nonce %d, block %d)", address, nonce, receipt["blockNumber"])
    return address


def ensure_deployed(journal: Journal, rpc_url: str | Web3, private_key: str,
                    contract_address: str | None = None) -> LedgerConfig:
    """Reuse the contract the journal (or the caller) names if its code is there, else deploy.

    Also tries the deterministic address (key's nonce 0) before deploying a new copy, so
    one recorder key maps to one contract: a journal recreated from scratch with the same
    key shares the old contract (and `edge-audit` reports the old events as
    missing_from_journal). The result is saved in the journal so `edge-audit` finds it.
    """
    w3 = connect(rpc_url) if isinstance(rpc_url, str) else rpc_url
    url = rpc_url if isinstance(rpc_url, str) else rpc_url_of(w3)
    recorder = Account.from_key(private_key).address
    chain_id, genesis = chain_identity(w3)
    saved = LedgerConfig.load(journal)
    candidates = [contract_address] if contract_address else []
    if saved is not None:
        candidates.append(saved.contract_address)
    candidates.append(create_address(recorder, 0))
    address = next((a for a in candidates if a and has_ledger_code(w3, a)), None)
    if address is None:
        address = deploy_contract(w3, private_key)
    config = LedgerConfig(rpc_url=url, contract_address=to_checksum_address(address), chain_id=chain_id,
                          genesis_hash=genesis, recorder=recorder)
    config.save(journal)
    return config


def create_address(sender: str, nonce: int) -> str:
    """CREATE address: keccak(rlp([sender, nonce]))[12:]."""
    return to_checksum_address(keccak(rlp.encode([bytes.fromhex(sender[2:]), nonce]))[12:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ledger.deploy", description="Deploy ExecutionLedger "
                                     "(or find it) and record its address in the journal.")
    parser.add_argument("--journal", required=True, help="journal SQLite file")
    parser.add_argument("--rpc-url", required=True, help="Ethereum JSON-RPC URL")
    parser.add_argument("--key", default=os.environ.get("EDGE_LEDGER_KEY"),
                        help="recorder private key (default: env EDGE_LEDGER_KEY)")
    args = parser.parse_args(argv)
    if not args.key:
        parser.error("no private key: pass --key or set EDGE_LEDGER_KEY")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = ensure_deployed(Journal(args.journal), args.rpc_url, args.key)
    except (DeployError, OSError) as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    print(f"contract {config.contract_address} on chain {config.chain_id} ({config.rpc_url})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
