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


def test_fast_canonical_json_is_byte_for_byte_json_dumps():
    """The audit's direct encoder must equal the json.dumps definition for every value shape."""
    import json
    import random

    from ledger.record import RECORD_FIELDS, _reference_json, canonical_json_of

    rng = random.Random(7)
    texts = ["", "a", "é€𝄞", "quote\"back\\slash", "ctl\x00\x1f\x7f", "\u2028\u2029", "tab\tnl\n", "日本"]
    for _ in range(500):
        values = {}
        for name in RECORD_FIELDS:
            kind = rng.randrange(4)
            if name in ("received_at", "started_at", "finished_at"):
                values[name] = [None, rng.random() * 2e9, float(rng.randrange(10**10)), 1e-7 * rng.random()][kind]
            else:
                values[name] = None if kind == 0 else rng.choice(texts) + str(rng.random())
        assert canonical_json_of(values) == _reference_json(values)
    # ints in time fields hash as floats (as ExecutionRecord stores them); odd types take the json path
    odd = {name: None for name in RECORD_FIELDS}
    assert canonical_json_of({**odd, "received_at": 5}) == _reference_json({**odd, "received_at": 5.0})
    assert canonical_json_of({**odd, "status": 3}) == _reference_json({**odd, "status": 3})
    with __import__("pytest").raises(ValueError):
        canonical_json_of({**odd, "received_at": float("nan")})
    assert json.loads(canonical_json_of({**odd, "task_id": "x"}))["task_id"] == "x"
