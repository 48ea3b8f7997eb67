"""The bad-input matrix at the serializer/admission level (fast, no broker):
each bad message is refused with its reason, counted, quarantined raw, never decoded
into a runnable task. Good messages (EC and RSA signers) are admitted once."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from pathlib import Path

import pytest
from celery import Celery
from kombu.serialization import dumps, loads

from security import metrics
from security.app_signing import admit, ensure_bound, get_verifier
from security.codec import CONTENT_TYPE
from security.envelope import parse_envelope, verify_envelope_signature
from security.pki import CertificateAuthority, utcnow
from security.signing import IdentityMismatch, SignatureRefused
from security.signing_config import SigningConfig
from security.signing_setup import setup_signing

from .apps import craft, signing_config

DAY = dt.timedelta(days=1)


@pytest.fixture
def receiver(signing_pki, tmp_path: Path) -> Celery:
    app = Celery("receiver", broker="memory://", set_as_current=False)
    setup_signing(app, signing_config(signing_pki, signing_pki.identity("coordinator"), tmp_path,
                                      max_message_bytes=64 * 1024))
    return app


def refused(app: Celery, headers: dict, body: bytes | str, reason: str, content_type: str = CONTENT_TYPE) -> None:
    quarantine = get_verifier(app).quarantine
    before_q, before_m = quarantine.count(reason), metrics.REFUSALS.get(reason)
    assert admit(app, headers, body, content_type) is None
    assert quarantine.count(reason) == before_q + 1, f"not quarantined as {reason}"
    assert metrics.REFUSALS.get(reason) == before_m + 1, f"not counted as {reason}"
    row = quarantine.rows(reason)[-1]
    raw = body.encode() if isinstance(body, str) else body
    assert row.body == raw, "quarantine must keep the raw message"
    assert row.task_id == headers.get("id")


def test_good_message_is_admitted_and_exposes_the_signer(receiver, signing_pki):
    headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "1"])
    vm = admit(receiver, headers, body, CONTENT_TYPE)
    assert vm is not None and vm.signer.agent_id == "agent-a"
    args, kwargs, embed = loads(body, CONTENT_TYPE, "binary")
    assert args == ["agent-a", "1"] and kwargs == {}
    assert embed["signer"] == vm.signer
    assert "__edge_meta__" not in embed
    verify_envelope_signature(embed["signer"].envelope, embed["signer"].certificate_pem)


def test_rsa_signer_is_accepted(receiver, signing_pki):
    ident = signing_pki.issue("agent-rsa", rsa=True)
    headers, body = craft(ident, "t.record", ["agent-rsa", "1"])
    assert json.loads(body)["alg"] == "RS256"
    assert admit(receiver, headers, body, CONTENT_TYPE).signer.agent_id == "agent-rsa"


def _flip_payload_byte(body: bytes) -> bytes:
    doc = json.loads(body)
    payload = bytearray(base64.b64decode(doc["payload"]))
    payload[len(payload) // 2] ^= 0x01
    doc["payload"] = base64.b64encode(bytes(payload)).decode()
    return json.dumps(doc, separators=(",", ":")).encode()


def test_tampered_byte_is_refused(receiver, signing_pki):
    headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "1"])
    refused(receiver, headers, _flip_payload_byte(body), "bad_signature")


def test_any_flipped_raw_byte_is_refused(receiver, signing_pki):
    headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "1"])
    for pos in range(0, len(body), max(1, len(body) // 40)):
        bad = bytearray(body)
        bad[pos] ^= 0x04
        headers = dict(headers, id=f"flip-{pos}")
        assert admit(receiver, headers, bytes(bad), CONTENT_TYPE) is None, f"flip at {pos} accepted"


def test_unknown_ca_is_refused(receiver, signing_pki, tmp_path):
    rogue = signing_pki.issue("agent-a", ca=CertificateAuthority.create("rogue CA"))
    headers, body = craft(rogue, "t.record", ["agent-a", "1"])
    refused(receiver, headers, body, "cert_untrusted")


def test_self_signed_and_ca_certificates_are_refused(receiver, signing_pki, tmp_path):
    from security.pki import write_pem, write_private_key

    from .conftest import Identity

    selfsigned = CertificateAuthority.create("agent-a")  # a self-signed cert with CN agent-a
    write_private_key(selfsigned.key, tmp_path / "ss.key")
    write_pem(selfsigned.cert, tmp_path / "ss.pem")
    headers, body = craft(Identity("agent-a", tmp_path / "ss.pem", tmp_path / "ss.key"), "t.record", ["agent-a", "1"])
    refused(receiver, headers, body, "cert_untrusted")
    # the fleet CA's own certificate is not a signer either (stock celery.security accepts it)
    ca_ident = Identity("ca", signing_pki.ca_path, signing_pki.fleet.directory / "ca.key")
    headers, body = craft(ca_ident, "t.record", ["agent-a", "1"])
    refused(receiver, headers, body, "cert_untrusted")


def test_expired_certificate_is_refused(receiver, signing_pki):
    old = signing_pki.issue("agent-old", not_before=utcnow() - 10 * DAY, not_after=utcnow() - DAY)
    headers, body = craft(old, "t.record", ["agent-old", "1"])
    refused(receiver, headers, body, "cert_expired")


def test_not_yet_valid_certificate_is_refused(receiver, signing_pki):
    future = signing_pki.issue("agent-future", not_before=utcnow() + DAY, not_after=utcnow() + 10 * DAY)
    headers, body = craft(future, "t.record", ["agent-future", "1"])
    refused(receiver, headers, body, "cert_not_yet_valid")


def test_revoked_certificate_is_refused(receiver, signing_pki):
    victim = signing_pki.issue("agent-stolen")
    headers, body = craft(victim, "t.record", ["agent-stolen", "1"])
    assert admit(receiver, headers, body, CONTENT_TYPE) is not None  # fine before revocation
    signing_pki.revoke(victim)
    headers, body = craft(victim, "t.record", ["agent-stolen", "2"])
    refused(receiver, headers, body, "cert_revoked")


def test_agent_signing_as_another_is_refused_by_ensure_bound(receiver, signing_pki):
    headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-b", "1"])
    vm = admit(receiver, headers, body, CONTENT_TYPE)
    assert vm is not None  # the envelope itself is genuine ...
    quarantine = get_verifier(receiver).quarantine
    before = quarantine.count("identity_mismatch")
    with pytest.raises(IdentityMismatch, match="signed by 'agent-a' claims agent 'agent-b'"):
        ensure_bound(vm.signer, "agent-b")  # ... but it may not speak for agent-b
    assert quarantine.count("identity_mismatch") == before + 1
    assert quarantine.rows("identity_mismatch")[-1].body == body
    assert ensure_bound(vm.signer, "agent-a") is vm.signer


def test_swapped_task_name_is_refused(receiver, signing_pki):
    headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "1"])
    refused(receiver, dict(headers, task="t.other"), body, "header_mismatch")


def test_replay_under_a_new_id_is_refused(receiver, signing_pki):
    headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "1"])
    assert admit(receiver, headers, body, CONTENT_TYPE) is not None
    refused(receiver, dict(headers, id="a-brand-new-id"), body, "header_mismatch")


def test_replay_with_the_same_id_is_refused(receiver, signing_pki):
    headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "1"])
    assert admit(receiver, headers, body, CONTENT_TYPE) is not None
    refused(receiver, headers, body, "replay")
    # a re-signed message reusing the id is a replay too
    headers2, body2 = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "1"], task_id=headers["id"])
    refused(receiver, headers2, body2, "replay")


def test_changed_eta_expires_or_retries_headers_are_refused(receiver, signing_pki):
    for field, value in (("eta", "2030-01-01T00:00:00+00:00"), ("expires", "2030-01-01T00:00:00+00:00"),
                         ("retries", 3)):
        headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "1"])
        refused(receiver, dict(headers, **{field: value}), body, "header_mismatch")


@pytest.mark.parametrize("offset", [-3600.0, +3600.0])
def test_stale_or_future_timestamp_is_refused(receiver, signing_pki, offset):
    headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "1"], sent_at=time.time() + offset)
    refused(receiver, headers, body, "stale")


def test_oversize_message_is_refused(receiver, signing_pki):
    headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "x" * 100_000])
    refused(receiver, headers, body, "oversize")


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"v": 1}', b"\xff\xfe\x00", b'{"v":1,"alg":"ES256","cert":"x","sig":"!!","payload":"e30="}'])
def test_malformed_envelopes_are_refused(receiver, body):
    refused(receiver, {"id": "m", "task": "t.record"}, body, "malformed")


def test_malformed_signed_payload_is_refused(receiver, signing_pki):
    from security.envelope import certificate_pem, sign_envelope
    from security.pki import load_certificate, load_private_key

    ident = signing_pki.identity("agent-a")
    body = sign_envelope(load_private_key(ident.key), certificate_pem(load_certificate(ident.cert)), b"[1,2,3]")
    refused(receiver, {"id": "p", "task": "t.record"}, body, "malformed")  # genuine signature, bad content


def test_unsigned_content_type_is_refused(receiver):
    refused(receiver, {"id": "j", "task": "t.record"}, b'[["agent-a", "1"], {}, {}]', "unsigned",
            content_type="application/json")


def test_signed_body_without_task_binding_is_refused(receiver, signing_pki):
    headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "1"], drop_meta=True)
    refused(receiver, headers, body, "unbound")


def test_allowed_signers_limit_who_may_send_tasks(signing_pki, tmp_path):
    app = Celery("agent-side", broker="memory://", set_as_current=False)
    setup_signing(app, signing_config(signing_pki, signing_pki.identity("agent-a"), tmp_path,
                                      allowed_signers={"coordinator"}))
    headers, body = craft(signing_pki.identity("agent-b"), "edge.agent.status", [])
    refused(app, headers, body, "signer_not_allowed")
    headers, body = craft(signing_pki.identity("coordinator"), "edge.agent.status", [])
    assert admit(app, headers, body, CONTENT_TYPE).signer.agent_id == "coordinator"


def test_results_and_control_messages_are_signed_and_verified(receiver):
    content_type, encoding, data = dumps({"task_id": "x", "status": "SUCCESS", "result": [1, 2]}, "edge-signed")
    assert content_type == CONTENT_TYPE and encoding == "binary"
    assert parse_envelope(data).payload  # it is an envelope
    assert loads(data, content_type, encoding) == {"task_id": "x", "status": "SUCCESS", "result": [1, 2]}
    with pytest.raises(Exception, match="bad_signature"):
        loads(_flip_payload_byte(data), content_type, encoding)


def test_verify_envelope_signature_for_auditors(signing_pki):
    from security.envelope import signed_payload

    headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "1"])
    doc = signed_payload(body)
    assert doc["kind"] == "task" and doc["meta"]["id"] == headers["id"] and doc["body"][0] == ["agent-a", "1"]
    a_pem = signing_pki.identity("agent-a").cert.read_text()
    b_pem = signing_pki.identity("agent-b").cert.read_text()
    verify_envelope_signature(body, a_pem)
    with pytest.raises(SignatureRefused, match="bad_signature"):
        verify_envelope_signature(body, b_pem)
    with pytest.raises(SignatureRefused, match="bad_signature"):
        verify_envelope_signature(_flip_payload_byte(body), a_pem)
    with pytest.raises(SignatureRefused, match="malformed"):
        verify_envelope_signature(b"garbage", a_pem)


def test_setup_refuses_a_key_that_does_not_match_the_certificate(signing_pki, tmp_path):
    from security.signing import SigningError

    a, b = signing_pki.identity("agent-a"), signing_pki.identity("agent-b")
    cfg = SigningConfig(key_path=a.key, cert_path=b.cert, ca_path=signing_pki.ca_path, crl_path=signing_pki.crl_path,
                        replay_db=tmp_path / "r.sqlite", quarantine_db=tmp_path / "q.sqlite")
    with pytest.raises(SigningError, match="does not match key"):
        setup_signing(Celery("bad", broker="memory://", set_as_current=False), cfg)


def test_apps_that_do_not_sign_are_left_untouched(receiver):
    """The publish hook is process-wide; a plain json app's messages must not change."""
    plain = Celery("plain", broker="memory://", set_as_current=False)
    plain.conf.task_default_queue = "plain-untouched"
    plain.send_task("t.plain", args=[1])
    with plain.connection_for_read() as conn:
        queue = conn.SimpleQueue("plain-untouched")
        msg = queue.get(timeout=5)
        args, kwargs, embed = msg.decode()
        msg.ack()
        queue.close()
    assert msg.content_type == "application/json"
    assert args == [1] and set(embed) == {"callbacks", "errbacks", "chain", "chord"}
