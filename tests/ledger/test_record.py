"""The execution record's canonical form is stable and what the auditor recomputes."""

import hashlib
import json

from ledger.record import STATUS_OTHER, ExecutionRecord, id_key, status_code

GOLDEN = ExecutionRecord(
    task_id="t-1", task_name="edge.ingest", agent_id="agent-é", signer_fingerprint="ab" * 32,
    args_digest="cd" * 32, result_digest=None, status="SUCCESS", received_at=1700000000.25,
    started_at=1700000000.5, finished_at=None, envelope_digest="ef" * 32,
)


def test_canonical_json_sorted_compact_utf8():
    text = GOLDEN.canonical_json()
    doc = json.loads(text)
    assert list(doc) == sorted(doc)
    assert b" " not in text and b"\n" not in text
    assert "agent-é".encode() in text  # raw UTF-8, not \u escapes
    assert doc["finished_at"] is None and doc["received_at"] == 1700000000.25


def test_digest_is_sha256_of_canonical_json_and_golden():
    assert GOLDEN.digest() == hashlib.sha256(GOLDEN.canonical_json()).digest()
    expected = hashlib.sha256(
        b'{"agent_id":"agent-\xc3\xa9","args_digest":"' + b"cd" * 32 + b'","envelope_digest":"' + b"ef" * 32
        + b'","finished_at":null,"received_at":1700000000.25,"result_digest":null,"signer_fingerprint":"'
        + b"ab" * 32 + b'","started_at":1700000000.5,"status":"SUCCESS","task_id":"t-1","task_name":"edge.ingest"}'
    ).digest()
    assert GOLDEN.digest() == expected


def test_roundtrip_from_mapping_keeps_digest():
    row = dict(GOLDEN.as_dict(), digest="ignored", anchor_state="pending")
    assert ExecutionRecord.from_mapping(row).digest() == GOLDEN.digest()


def test_keys_status_and_timestamp():
    assert GOLDEN.task_key == hashlib.sha256(b"t-1").digest() == id_key("t-1")
    assert status_code("SUCCESS") == 1 and status_code("weird") == STATUS_OTHER
    assert GOLDEN.finished_at_ms == 1700000000250  # falls back to received_at


def test_integer_times_hash_like_the_floats_sqlite_returns():
    as_int = ExecutionRecord.from_mapping(dict(GOLDEN.as_dict(), received_at=1700000000))
    as_float = ExecutionRecord.from_mapping(dict(GOLDEN.as_dict(), received_at=1700000000.0))
    assert as_int.digest() == as_float.digest() and isinstance(as_int.received_at, float)
