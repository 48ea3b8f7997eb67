"""Record factories and an eth-tester chain for ledger tests."""

from __future__ import annotations

import hashlib
import time
import uuid

from ledger.record import ExecutionRecord


def make_record(n: int = 0, *, agent: str = "agent-1", task_name: str = "edge.ingest", status: str = "SUCCESS",
                received_at: float | None = None, envelope: bytes | None = None,
                fingerprint: str | None = None, task_id: str | None = None) -> ExecutionRecord:
    now = time.time() if received_at is None else received_at
    return ExecutionRecord(
        task_id=task_id or str(uuid.uuid4()), task_name=task_name, agent_id=agent,
        signer_fingerprint=fingerprint, args_digest=hashlib.sha256(f"args{n}".encode()).hexdigest(),
        result_digest=hashlib.sha256(f"result{n}".encode()).hexdigest(), status=status,
        received_at=now, started_at=now + 0.001, finished_at=now + 0.002,
        envelope_digest=hashlib.sha256(envelope).hexdigest() if envelope is not None else None,
    )


def eth_tester_chain():
    """(w3, [private keys hex]) on a fresh in-process eth-tester chain."""
    from eth_tester import EthereumTester
    from web3 import EthereumTesterProvider, Web3

    tester = EthereumTester()
    w3 = Web3(EthereumTesterProvider(tester))
    keys = ["0x" + bytes(k.to_bytes()).hex() for k in tester.backend.account_keys]
    return w3, keys


def make_log(journal, name: str | None = None, **kw):
    """A fresh log key for `journal` (remembered in its config, as the coordinator does) and its Checkpointer."""
    from ledger.checkpointer import Checkpointer
    from ledger.tlog.note import Ed25519Signer

    signer = Ed25519Signer.generate(name or f"edgeledger/test/{uuid.uuid4().hex[:12]}")
    journal.set_config(log_origin=signer.name, log_vkey=signer.verifier().vkey)
    return Checkpointer(journal, signer, **kw)


def log_policy(checkpointer, pins=None):
    from ledger.audit import LogPolicy

    return LogPolicy(checkpointer.signer.verifier(), pins)
