"""Fast unit layer for the split signing modules: the named admission checks, the publish-time
header memory, and the import graph (no circle between the Celery layer and the plain types)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from security.admission import Delivery, check_binding, check_delay, check_routing, check_send_delay, replay_key
from security.codec import VerifiedMessage
from security.serializers import PublishMeta
from security.signing import SignatureRefused, SignerInfo, SigningError

ROOT = Path(__file__).resolve().parents[2]
SIGNER = SignerInfo(agent_id="a", fingerprint="f" * 64, envelope_digest="d" * 64, envelope=b"", certificate_pem="")


def _vm(meta: dict | None, *, sent_at: float = 1000.0, eta: float | None = None, kind: str = "task") -> VerifiedMessage:
    return VerifiedMessage(kind=kind, sent_at=sent_at, meta=meta, payload=b"{}", signer=SIGNER, eta=eta)


META = {"task": "t", "id": "i", "eta": None, "expires": None, "retries": 0, "routing_key": "q"}


def test_binding_refuses_unbound_and_mismatched_headers() -> None:
    check_binding(_vm(META), {"task": "t", "id": "i"})  # retries absent == 0
    with pytest.raises(SignatureRefused) as exc:
        check_binding(_vm(None), {"task": "t"})
    assert exc.value.reason == "unbound"
    with pytest.raises(SignatureRefused) as exc:
        check_binding(_vm(META), {"task": "t", "id": "other"})
    assert exc.value.reason == "header_mismatch" and "id" in exc.value.detail


def test_routing_must_match_delivery_and_consumed_queues() -> None:
    check_routing(_vm(META), Delivery(routing_key="q", queues=frozenset({"q"})))
    for meta, delivery in [({**META, "routing_key": None}, Delivery("q")),
                           (META, Delivery("other")),
                           (META, Delivery("q", frozenset({"not-q"})))]:
        with pytest.raises(SignatureRefused) as exc:
            check_routing(_vm(meta), delivery)
        assert exc.value.reason == "routing_key_mismatch"


def test_delay_limits_on_receive_and_send() -> None:
    check_delay(_vm(META, sent_at=1000.0, eta=1060.0), limit=60)
    with pytest.raises(SignatureRefused) as exc:
        check_delay(_vm(META, sent_at=1000.0, eta=1061.0), limit=60)
    assert exc.value.reason == "eta_too_far"
    check_send_delay("t", None, limit=0)
    with pytest.raises(SigningError, match="max_delay_seconds"):
        check_send_delay("t", "2999-01-01T00:00:00+00:00", limit=60)


def test_replay_key_is_per_signer() -> None:
    assert replay_key("a", "i", None) == "a/i:0" != replay_key("b", "i", 0)


def test_publish_meta_is_found_only_for_the_same_body_object() -> None:
    memory = PublishMeta()
    body = ([], {}, {})
    memory.on_before_publish(body=body, headers={"task": "t", "id": "i", "retries": None}, routing_key="q")
    assert memory.lookup(body) == {"task": "t", "id": "i", "eta": None, "expires": None, "retries": 0,
                                   "routing_key": "q"}
    assert memory.lookup(([], {}, {})) is None  # an equal but different body: not this publish


def test_plain_types_and_reply_backend_import_no_circle() -> None:
    code = ("import sys, security.signing; assert not [m for m in sys.modules if m.startswith('security.')"
            " and m != 'security.signing'], sorted(sys.modules); "
            "import security.reply_backend; assert 'security.signing_setup' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
