"""coordinator.remote_control: the worker's pidbox runs commands signed by the coordinator only.

In-process, with real certificates of one fleet CA: the second lock behind the broker
ACL (tests/redteam/test_7_remote_control.py shows the first one against a real broker).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kombu import pidbox
from kombu.utils import json as kjson

from coordinator.remote_control import REFUSAL, operator_only_node
from security.codec import CONTENT_TYPE
from security.envelope import certificate_pem, sign_envelope
from security.pki import load_certificate, load_private_key
from security.quarantine import Quarantine
from security.signing_config import SigningConfig
from security.verifier import Verifier


def control_message(test_pki, signer: str, body: dict[str, Any], content_type: str = CONTENT_TYPE) -> SimpleNamespace:
    """What the worker's pidbox consumer hands the node: raw signed body + content type."""
    cert, key = test_pki.client(signer)
    payload = kjson.dumps({"kind": "data", "sent_at": time.time(), "nonce": uuid.uuid4().hex, "meta": None, "body": body})
    envelope = sign_envelope(load_private_key(key), certificate_pem(load_certificate(cert)), payload.encode())
    return SimpleNamespace(body=envelope, content_type=content_type, headers={})


@pytest.fixture
def setup(test_pki, tmp_path: Path):
    cert, key = test_pki.client("coordinator")
    verifier = Verifier(SigningConfig(key_path=key, cert_path=cert, ca_path=test_pki.ca_path,
                                      quarantine_db=tmp_path / "q.sqlite", replay_db=tmp_path / "r.sqlite"))
    calls: list[str] = []
    mailbox = pidbox.Mailbox("rc-test", type="fanout", accept=[CONTENT_TYPE])
    mailbox.node_cls = operator_only_node(verifier, frozenset({"coordinator"}))
    node = mailbox.Node("coordinator@test", handlers={"shutdown": lambda state, **_: calls.append("shutdown") or "bye"})
    return node, calls, Quarantine(tmp_path / "q.sqlite")


BODY = {"method": "shutdown", "arguments": {}, "destination": None, "pattern": None, "matcher": None}


def test_command_signed_by_the_coordinator_runs(setup, test_pki) -> None:
    node, calls, quarantine = setup
    assert node.handle_message(dict(BODY), control_message(test_pki, "coordinator", BODY)) == "bye"
    assert calls == ["shutdown"]
    assert quarantine.rows() == []


def test_command_signed_by_an_agent_is_refused_and_quarantined(setup, test_pki) -> None:
    node, calls, quarantine = setup
    assert node.handle_message(dict(BODY), control_message(test_pki, "agent-x", BODY)) is None
    assert calls == []
    (row,) = quarantine.rows()
    assert row.reason == REFUSAL and "'agent-x' may not use remote control" in row.detail


def test_unsigned_command_is_refused(setup, test_pki) -> None:
    node, calls, quarantine = setup
    message = SimpleNamespace(body=kjson.dumps(BODY).encode(), content_type="application/json", headers={})
    assert node.handle_message(dict(BODY), message) is None
    assert calls == []
    assert [r.reason for r in quarantine.rows()] == ["unsigned"]
