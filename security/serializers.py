"""The only process-wide signing state, and why it has to be process-wide.

kombu's serializer registry is global: a name maps to one encoder and one decoder for
the whole process, and kombu calls them with the body alone (no app). So:
- each signing identity gets its own serializer name (the first `edge-signed`, later
  ones `edge-signed-<fingerprint>`), so two apps in one process each sign as
  themselves;
- decodes that come with no app (rpc:// results, control replies) use the verifier
  of the last app set up (`default_verifier`);
- the header fields of the task being published travel from Celery's (also global)
  `before_task_publish` signal to the encoder in a thread-local keyed by the body
  object kombu hands over (`PublishMeta`), since the encoder cannot be given them.
Everything else lives on the app (security.app_signing).
"""

from __future__ import annotations

import threading
from typing import Any

from kombu.serialization import register as register_serializer

from .codec import CONTENT_TYPE, SERIALIZER, SIGNED_HEADERS, Identity
from .signing import SigningError
from .verifier import Verifier


class PublishMeta:
    """The header fields of the task being published right now, keyed by the identity
    of its body object: kombu hands that same object to the encoder (also on publish
    retries). Thread-local, and nothing is added to the message of apps that do not sign."""

    def __init__(self) -> None:
        self._local = threading.local()

    def on_before_publish(self, sender: str | None = None, body: Any = None, headers: dict | None = None,
                          routing_key: str | None = None, **_: Any) -> None:
        """`before_task_publish` receiver: remember the header fields that decide what runs."""
        if not headers or not isinstance(body, (tuple, list)) or len(body) != 3 or not isinstance(body[2], dict):
            return
        meta = {name: headers.get(name) for name in SIGNED_HEADERS}
        meta["retries"] = meta["retries"] or 0
        meta["routing_key"] = routing_key
        self._local.item = (body, meta)

    def lookup(self, body: Any) -> dict[str, Any] | None:
        """The fields remembered for exactly this body object, or None."""
        item = getattr(self._local, "item", None)
        return item[1] if item is not None and item[0] is body else None


class ProcessSerializers:
    """One serializer name per signing identity, and the verifier for app-less decodes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: dict[str, str] = {}  # certificate fingerprint -> serializer name
        self.default_verifier: Verifier | None = None
        self.publish_meta = PublishMeta()

    def register(self, fingerprint: str, identity: Identity, verifier: Verifier) -> str:
        """Register (or re-register) the serializer of `identity`; returns its name."""
        with self.lock:
            name = self.names.get(fingerprint) or (SERIALIZER if not self.names else f"{SERIALIZER}-{fingerprint[:12]}")
            self.names[fingerprint] = name
            self.default_verifier = verifier
            register_serializer(name, identity.encode, self.decode, content_type=CONTENT_TYPE,
                                content_encoding="binary")
        return name

    def verifier(self) -> Verifier:
        """The verifier for decodes that come with no app: the last app set up."""
        if self.default_verifier is None:
            raise SigningError("signing is not set up: call security.signing_setup.setup_signing(app, config) first")
        return self.default_verifier

    def decode(self, data: bytes | str) -> Any:
        return self.verifier().decode(data)


#: The process's one instance: kombu's registry it mirrors is process-wide too.
PROCESS = ProcessSerializers()
