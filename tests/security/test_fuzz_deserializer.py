"""Fuzz the signed-message deserializer: arbitrary bytes and mutations of a genuine
envelope never crash it with anything but a refusal, and never yield a task."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.exceptions import DecodeError
from kombu.serialization import loads

from security.app_signing import admit
from security.codec import CONTENT_TYPE
from security.signing_setup import setup_signing

from .apps import craft, signing_config

FUZZ = settings(max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                database=None)


@pytest.fixture(scope="module")
def fuzz_env(signing_pki, tmp_path_factory):
    workdir: Path = tmp_path_factory.mktemp("fuzz")
    app = Celery("fuzz", broker="memory://", set_as_current=False)
    setup_signing(app, signing_config(signing_pki, signing_pki.identity("coordinator"), workdir,
                                      max_message_bytes=16 * 1024))
    headers, body = craft(signing_pki.identity("agent-a"), "t.record", ["agent-a", "fuzz"])
    return app, headers, body


def refuses(data: bytes) -> None:
    if not data:
        return  # kombu hands empty bodies back without calling a decoder; admit() refuses them
    try:
        result = loads(data, CONTENT_TYPE, "binary")
    except DecodeError:
        return
    raise AssertionError(f"decoder accepted fuzzed input: {result!r}")


def test_arbitrary_bytes_are_refused(fuzz_env):
    app = fuzz_env[0]
    @FUZZ
    @given(st.one_of(st.binary(max_size=2048), st.text(max_size=512).map(str.encode),
                     st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                  lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                                  max_leaves=12).map(lambda v: __import__("json").dumps({"v": 1, "x": v}).encode())))
    def check(data: bytes) -> None:
        refuses(data)
        assert admit(app, {"id": "fuzz", "task": "t.record"}, data, CONTENT_TYPE) is None

    check()


def test_mutated_genuine_envelopes_are_refused(fuzz_env):
    app, headers, genuine = fuzz_env

    @FUZZ
    @given(st.data())
    def check(data) -> None:
        body = bytearray(genuine)
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, len(body) - 1))
        if op == "flip":
            body[pos] ^= data.draw(st.integers(1, 255))
        elif op == "set":
            new = data.draw(st.integers(0, 255))
            if new == body[pos]:
                new ^= 1
            body[pos] = new
        elif op == "insert":
            body.insert(pos, data.draw(st.integers(0, 255)))
        elif op == "delete":
            del body[pos]
        else:
            del body[pos:]
        mutated = bytes(body)
        assert mutated != genuine
        refuses(mutated)
        assert admit(app, dict(headers, id=f"fuzz-{op}-{pos}"), mutated, CONTENT_TYPE) is None

    check()
