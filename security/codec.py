"""The `edge-signed` wire format: what a signed Celery body looks like inside its envelope.

Why its own module: the encoder (one per signing identity), the verifier and the
admission checks all read or write the same payload shape
`{"kind", "sent_at", "nonce", "meta", "body"}`; keeping it in one place keeps them in
step. No state: the publish-time header fields reach the encoder as an argument.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kombu.utils import json as kjson

from .envelope import sign_envelope
from .pki import PrivateKey
from .policy import CANVAS_EMBED_FIELDS
from .signing import SignatureRefused, SignerInfo

SERIALIZER = "edge-signed"
CONTENT_TYPE = "application/x-edge-signed"
META_KEY = "__edge_meta__"
SIGNED_HEADERS = ("task", "id", "eta", "expires", "retries")
EMBED_FIELDS = frozenset({"callbacks", "errbacks", "chain", "chord", *CANVAS_EMBED_FIELDS})

#: Returns the signed header fields kombu's caller remembered for exactly this body
#: object (security.serializers.PublishMeta), or None.
MetaLookup = Callable[[Any], "dict[str, Any] | None"]


def parse_eta(value: Any) -> float | None:
    """A Celery eta header (ISO 8601) as a unix timestamp; naive times are UTC."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SignatureRefused("malformed", f"eta {value!r} is not an ISO 8601 string")
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise SignatureRefused("malformed", f"eta {value!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


@dataclass(frozen=True)
class VerifiedMessage:
    """A message whose signature, certificate and freshness checks passed."""

    kind: str  # "task" or "data" (results, control replies)
    sent_at: float
    meta: dict[str, Any] | None
    payload: bytes
    signer: SignerInfo
    eta: float | None = None  # signed eta of a task (unix seconds)

    def body(self) -> Any:
        doc = kjson.loads(self.payload)
        body = doc["body"]
        if self.kind == "task" and isinstance(body, list) and len(body) == 3 and isinstance(body[2], dict):
            body[2]["signer"] = self.signer
        return body


def task_body(vm: VerifiedMessage) -> tuple[list, dict, dict]:
    """The signed [args, kwargs, embed], with an embed that can only carry canvas fields
    (anything else would override the worker's own request fields, e.g. reply_to)."""
    try:
        args, kwargs, embed = kjson.loads(vm.payload)["body"]
    except (ValueError, TypeError, KeyError):
        raise SignatureRefused("malformed", "signed task body is not [args, kwargs, embed]") from None
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        raise SignatureRefused("malformed", "signed task body is not [list, object, object]")
    extra = set(embed) - EMBED_FIELDS
    if extra:
        raise SignatureRefused("malformed", f"signed task embed carries unexpected fields {sorted(extra)}")
    return args, kwargs, embed


class Identity:
    """One signing identity (key + certificate): the encoder of one serializer name.

    lookup_meta: where the header fields remembered at publish time are found (kombu
    calls an encoder with the body only); None: only a body that carries META_KEY
    itself is signed as a task.
    """

    def __init__(self, key: PrivateKey, cert_pem: str, lookup_meta: MetaLookup | None = None) -> None:
        self.key = key
        self.cert_pem = cert_pem
        self.lookup_meta = lookup_meta

    def encode(self, body: Any, sent_at: float | None = None) -> bytes:
        kind, meta = "data", None
        if isinstance(body, (tuple, list)) and len(body) == 3 and isinstance(body[2], dict):
            embed = body[2]
            if META_KEY in embed or "callbacks" in embed:
                remembered = self.lookup_meta(body) if self.lookup_meta is not None else None
                kind = "task"
                meta = remembered if remembered is not None else embed.get(META_KEY)
                body = [body[0], body[1], {k: v for k, v in embed.items() if k not in (META_KEY, "signer")}]
        payload = kjson.dumps({
            "kind": kind, "sent_at": time.time() if sent_at is None else sent_at,
            "nonce": uuid.uuid4().hex, "meta": meta, "body": body,
        })
        return sign_envelope(self.key, self.cert_pem, payload.encode())
