"""Signed Celery messages: tasks, results and control messages, bound to identity.

Why (gaps of stock celery.security closed here, see DESIGN.md):
- the task name, id, eta, expires, retry number and a send timestamp are inside the
  signed payload and must match the message headers (no replay under a new id, no
  re-targeting to another task);
- the signer certificate travels in the envelope and must chain to the fleet CA,
  be inside its validity window and not be revoked (CRL);
- the signer is exposed to the task as `self.request.signer`;
- a task (id, retry) runs once, and only while its timestamp is fresh;
- every refusal is logged, counted by reason and the raw message quarantined;
- the crypto runs once per message (the consumer verifies; the execution path
  re-uses the verified result).

Hook points: a kombu serializer (`edge-signed`), the `before_task_publish` signal
(copies header fields into the signed body), and a consumer strategy installed on
the app's task base class (checks header binding and replay before a Request exists).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery, Task, signals
from celery.worker.strategy import default as default_strategy
from kombu.serialization import register as register_serializer
from kombu.utils import json as kjson

from . import metrics
from .envelope import (
    certificate_pem,
    check_signature,
    load_envelope_certificate,
    parse_envelope,
    sign_envelope,
)
from .pki import PrivateKey, fingerprint, load_certificate, load_private_key
from .quarantine import Quarantine
from .replay import ReplayGuard
from .signing import SignatureRefused, SignerInfo, SigningError, set_refusal_sink
from .trust import TrustStore

log = logging.getLogger("edgeledger.security")

SERIALIZER = "edge-signed"
CONTENT_TYPE = "application/x-edge-signed"
META_KEY = "__edge_meta__"
SIGNED_HEADERS = ("task", "id", "eta", "expires", "retries")
CACHE_SECONDS = 30.0  # a verified message is decoded 2-3 times in quick succession
CACHE_ENTRIES = 1024

# Verified messages by envelope digest, shared by every Verifier in the process, so the
# consumer's check and the execution path's decode run the crypto once.
_verified: "OrderedDict[str, tuple[float, tuple, VerifiedMessage]]" = OrderedDict()
_cache_lock = threading.Lock()


@dataclass
class SigningConfig:
    """Where this process's identity and trust anchors live, and the refusal limits."""

    key_path: Path
    cert_path: Path
    ca_path: Path
    crl_path: Path | None = None
    replay_db: Path | None = None  # default: <key dir>/replay.sqlite
    quarantine_db: Path | None = None  # default: <key dir>/quarantine.sqlite
    max_age_seconds: float = 300.0
    max_message_bytes: int = 256 * 1024
    allowed_signers: frozenset[str] | None = None  # CNs allowed to send tasks here (None: any fleet cert)
    rpc_reply_exchange: str | None = "c.rep"  # rpc:// results via this exchange (broker ACL); None: stock rpc

    def __post_init__(self) -> None:
        self.key_path, self.cert_path, self.ca_path = Path(self.key_path), Path(self.cert_path), Path(self.ca_path)
        self.crl_path = Path(self.crl_path) if self.crl_path else None
        base = self.key_path.parent
        self.replay_db = Path(self.replay_db) if self.replay_db else base / "replay.sqlite"
        self.quarantine_db = Path(self.quarantine_db) if self.quarantine_db else base / "quarantine.sqlite"
        if self.allowed_signers is not None:
            self.allowed_signers = frozenset(self.allowed_signers)
        if self.max_age_seconds <= 0 or self.max_message_bytes <= 0:
            raise SigningError("max_age_seconds and max_message_bytes must be positive")


@dataclass(frozen=True)
class VerifiedMessage:
    """A message whose signature, certificate and freshness checks passed."""

    kind: str  # "task" or "data" (results, control replies)
    sent_at: float
    meta: dict[str, Any] | None
    payload: bytes
    signer: SignerInfo

    def body(self) -> Any:
        doc = kjson.loads(self.payload)
        body = doc["body"]
        if self.kind == "task" and isinstance(body, list) and len(body) == 3 and isinstance(body[2], dict):
            body[2]["signer"] = self.signer
        return body


class Verifier:
    """The process-wide checks every incoming signed message goes through."""

    def __init__(self, config: SigningConfig) -> None:
        self.config = config
        self.trust = TrustStore(config.ca_path, config.crl_path)
        self.quarantine = Quarantine(config.quarantine_db)  # type: ignore[arg-type]
        self.max_bytes = config.max_message_bytes
        self.max_age = config.max_age_seconds
        # What decides a verdict: a cached verdict of another Verifier counts only when equal.
        self.policy = (fingerprint(self.trust.ca), str(config.crl_path), self.max_bytes, self.max_age)

    def verify(self, data: bytes | str, any_policy: bool = False) -> VerifiedMessage:
        """Full check (crypto once per distinct message; repeats hit a short-lived cache).

        any_policy: accept a verdict cached by another app's Verifier (the decode path,
        which runs right after the consuming app's own check and has no app at hand).
        """
        raw = data.encode() if isinstance(data, str) else bytes(data)
        digest = hashlib.sha256(raw).hexdigest()
        now = time.time()
        with _cache_lock:
            hit = _verified.get(digest)
        if hit is not None and now - hit[0] < CACHE_SECONDS and (any_policy or hit[1] == self.policy):
            return hit[2]
        env = parse_envelope(raw, self.max_bytes)
        cert = load_envelope_certificate(env.certificate_pem)
        trusted = self.trust.validate(cert, cache_key=env.certificate_pem)  # canonical PEM (strict parse)
        check_signature(env, cert)
        try:
            doc = kjson.loads(env.payload)
            kind, sent_at, meta = doc["kind"], float(doc["sent_at"]), doc.get("meta")
            doc["body"]
        except (ValueError, TypeError, KeyError) as exc:
            raise SignatureRefused("malformed", f"signed payload is not a valid message: {exc!r}") from None
        if kind not in ("task", "data") or (meta is not None and not isinstance(meta, dict)):
            raise SignatureRefused("malformed", f"signed payload has unknown kind {kind!r}")
        if abs(now - sent_at) > self.max_age:
            raise SignatureRefused(
                "stale", f"message sent at {sent_at:.3f} is {now - sent_at:+.1f}s from now; limit ±{self.max_age:g}s"
            )
        signer = SignerInfo(
            agent_id=trusted.agent_id, fingerprint=trusted.fingerprint, envelope_digest=digest,
            envelope=raw, certificate_pem=trusted.certificate_pem,
        )
        vm = VerifiedMessage(kind=kind, sent_at=sent_at, meta=meta, payload=env.payload, signer=signer)
        with _cache_lock:
            _verified[digest] = (now, self.policy, vm)
            while len(_verified) > CACHE_ENTRIES:
                _verified.popitem(last=False)
        metrics.ACCEPTED.inc(kind)
        return vm

    def record(
        self,
        exc: SignatureRefused,
        raw: bytes | str | None,
        *,
        headers: dict[str, Any] | None = None,
        signer: str | None = None,
    ) -> None:
        """Log, count and quarantine one refusal. Never raises (a refusal must not crash the worker)."""
        headers = headers or {}
        task_id, task_name = headers.get("id"), headers.get("task")
        log.warning(
            "refused message: reason=%s task=%s id=%s signer=%s: %s", exc.reason, task_name, task_id, signer, exc.detail
        )
        metrics.REFUSALS.inc(exc.reason)
        try:
            self.quarantine.add(
                exc.reason, exc.detail, raw, headers=headers, signer=signer,
                task_id=str(task_id) if task_id else None, task_name=str(task_name) if task_name else None,
            )
        except Exception:  # noqa: BLE001 - quarantine trouble must not lose the log line above
            log.exception("could not write refused message to quarantine %s", self.quarantine.path)

    # kombu decoder -------------------------------------------------------
    def decode(self, data: bytes | str) -> Any:
        try:
            vm = self.verify(data, any_policy=True)
        except SignatureRefused as exc:
            self.record(exc, data)
            raise
        except Exception as exc:  # noqa: BLE001 - a checker bug must refuse, never pass
            log.exception("signature check failed unexpectedly")
            refusal = SignatureRefused("check_error", repr(exc))
            self.record(refusal, data)
            raise refusal from exc
        return vm.body()


class _Identity:
    """One signing identity (key + certificate): the encoder of one serializer name."""

    def __init__(self, key: PrivateKey, cert_pem: str) -> None:
        self.key = key
        self.cert_pem = cert_pem

    def encode(self, body: Any, sent_at: float | None = None) -> bytes:
        kind, meta = "data", None
        if isinstance(body, (tuple, list)) and len(body) == 3 and isinstance(body[2], dict):
            embed = body[2]
            if META_KEY in embed or "callbacks" in embed:
                pending = getattr(_pending, "item", None)
                kind = "task"
                meta = pending[1] if pending is not None and pending[0] is body else embed.get(META_KEY)
                body = [body[0], body[1], {k: v for k, v in embed.items() if k not in (META_KEY, "signer")}]
        payload = kjson.dumps({
            "kind": kind, "sent_at": time.time() if sent_at is None else sent_at,
            "nonce": uuid.uuid4().hex, "meta": meta, "body": body,
        })
        return sign_envelope(self.key, self.cert_pem, payload.encode())


@dataclass
class _AppContext:
    config: SigningConfig
    serializer: str
    guard: ReplayGuard
    identity: _Identity
    agent_id: str
    verifier: Verifier


_state_lock = threading.Lock()
_verifier: Verifier | None = None
_identities: dict[str, str] = {}  # certificate fingerprint -> serializer name
_apps: "weakref.WeakKeyDictionary[Celery, _AppContext]" = weakref.WeakKeyDictionary()


def get_verifier(app: Celery | None = None) -> Verifier:
    """The verifier of `app`, or the process default (the last app set up) for decodes
    that come with no app (results, control replies)."""
    if app is not None and app in _apps:
        return _apps[app].verifier
    if _verifier is None:
        raise SigningError("signing is not set up: call security.celery_signing.setup_signing(app, config) first")
    return _verifier


def _decode(data: bytes | str) -> Any:
    return get_verifier().decode(data)


# The header fields of the task being published right now, keyed by the identity of
# its body object: kombu hands that same object to our encoder (also on publish
# retries). Thread-local, and nothing is added to the message of apps that do not sign.
_pending = threading.local()


def _on_before_publish(sender: str | None = None, body: Any = None, headers: dict | None = None,
                       routing_key: str | None = None, **_: Any) -> None:
    """Remember the header fields that decide what runs, for the encoder to sign."""
    if not headers or not isinstance(body, (tuple, list)) or len(body) != 3 or not isinstance(body[2], dict):
        return
    meta = {name: headers.get(name) for name in SIGNED_HEADERS}
    meta["retries"] = meta["retries"] or 0
    meta["routing_key"] = routing_key
    _pending.item = (body, meta)


def _on_task_postrun(sender: Task | None = None, task_id: str | None = None, **_: Any) -> None:
    ctx = _apps.get(sender.app) if sender is not None else None
    if ctx is None or task_id is None:
        return
    try:
        ctx.guard.mark_done(f"{task_id}:{sender.request.retries or 0}")
    except Exception:  # noqa: BLE001 - bookkeeping must not fail the task
        log.exception("could not mark task %s done in the replay guard", task_id)


def check_binding(vm: VerifiedMessage, headers: dict[str, Any]) -> None:
    """The signed copy of the header fields must equal the headers that drive execution."""
    if vm.kind != "task" or not vm.meta:
        raise SignatureRefused("unbound", "signed body carries no task binding (not sent through a signing app?)")
    for name in SIGNED_HEADERS:
        got, signed = headers.get(name), vm.meta.get(name)
        if name == "retries":
            got, signed = got or 0, signed or 0
        if got != signed:
            raise SignatureRefused("header_mismatch", f"header {name}={got!r} differs from the signed {signed!r}")


def admit(app: Celery, headers: dict[str, Any], body: bytes | str, content_type: str | None) -> VerifiedMessage | None:
    """Every check an incoming task message must pass, in order; None when refused.

    A refusal is logged, counted and quarantined here, once.
    """
    ctx = _apps.get(app)
    if ctx is None:
        raise SigningError("setup_signing was not called for this app")
    verifier = ctx.verifier
    allowed = ctx.config.allowed_signers
    signer_id: str | None = None
    try:
        if content_type != CONTENT_TYPE:
            raise SignatureRefused("unsigned", f"content type {content_type!r} is not {CONTENT_TYPE}")
        vm = verifier.verify(body)
        signer_id = vm.signer.agent_id
        check_binding(vm, headers)
        if allowed is not None and signer_id not in allowed:
            raise SignatureRefused("signer_not_allowed", f"{signer_id!r} may not send tasks to this worker")
        ctx.guard.accept(f"{headers.get('id')}:{headers.get('retries') or 0}", vm.signer.envelope_digest,
                         vm.sent_at, signer_id)
    except SignatureRefused as exc:
        verifier.record(exc, body, headers=headers, signer=signer_id)
        return None
    except Exception as exc:  # noqa: BLE001 - a checker bug must refuse, never run the task
        log.exception("signature check failed unexpectedly")
        verifier.record(SignatureRefused("check_error", repr(exc)), body, headers=headers, signer=signer_id)
        return None
    return vm


def signed_strategy(task: Task, app: Celery, consumer: Any, **kwargs: Any):
    """Consumer strategy: verify + bind + replay-check before Celery builds a Request."""
    inner = default_strategy(task, app, consumer, **kwargs)
    connection_errors = consumer.connection_errors
    if app not in _apps:
        raise SigningError(f"task {task.name} uses signed_strategy but setup_signing was not called for its app")

    def handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        if admit(app, dict(message.headers or {}), message.body, message.content_type) is None:
            # Kept in quarantine; acking stops the broker from redelivering it forever.
            ack(log, connection_errors)
            return None
        return inner(message, body, ack, reject, callbacks, **kw)

    return handler


class SignedTask(Task):
    """Optional explicit base class; setup_signing also patches the app's own base."""

    abstract = True
    Strategy = "security.celery_signing:signed_strategy"

    @property
    def signer(self) -> SignerInfo | None:
        return getattr(self.request, "signer", None)


def _patch_tasks(app: Celery) -> None:
    for task in app.tasks.values():
        task.Strategy = signed_strategy


def _sink(exc: SignatureRefused, signer: SignerInfo | None) -> None:
    from celery._state import get_current_task

    headers: dict[str, Any] = {}
    app = None
    task = get_current_task()
    if task is not None and task.request is not None and task.request.id:
        headers = {"id": task.request.id, "task": task.name}
        app = task.app
    verifier = _apps[app].verifier if app is not None and app in _apps else _verifier
    if verifier is None:
        log.warning("refused message: %s", exc)
        return
    verifier.record(exc, signer.envelope if signer else None, headers=headers,
                    signer=signer.agent_id if signer else None)


def setup_signing(app: Celery, config: SigningConfig) -> _AppContext:
    """Make `app` sign everything it sends and verify everything it receives.

    Tasks are checked with the consuming app's own settings. Decodes that come without
    an app (rpc:// results, control replies) use the last app set up in the process.
    The signing identity is per app, so an agent and a coordinator app can live in one
    process (tests, demos) each signing as itself. Call it before the worker starts.
    """
    global _verifier
    key = load_private_key(config.key_path)
    cert = load_certificate(config.cert_path)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise SigningError(f"certificate {config.cert_path} does not match key {config.key_path}: re-enroll")
    verifier = Verifier(config)
    own = verifier.trust.validate(cert)  # refuse to start with a certificate nobody would accept
    with _state_lock:
        _verifier = verifier
        fp = own.fingerprint
        name = _identities.get(fp) or (SERIALIZER if not _identities else f"{SERIALIZER}-{fp[:12]}")
        _identities[fp] = name
        identity = _Identity(key, certificate_pem(cert))
        register_serializer(name, identity.encode, _decode, content_type=CONTENT_TYPE, content_encoding="binary")
        ctx = _AppContext(config=config, serializer=name, guard=ReplayGuard(config.replay_db, config.max_age_seconds),  # type: ignore[arg-type]
                          identity=identity, agent_id=own.agent_id, verifier=verifier)
        _apps[app] = ctx
    app.conf.update(
        task_serializer=name, result_serializer=name,
        accept_content=[CONTENT_TYPE], result_accept_content=[CONTENT_TYPE],
        event_serializer="json",
    )
    backend = str(app.conf.result_backend or "")
    if config.rpc_reply_exchange and (backend == "rpc" or backend.startswith("rpc://")):
        from .reply_backend import BACKEND_PATH

        app.conf.result_backend = BACKEND_PATH
        app._backend_cache = None  # built lazily from conf on next use
        app._local.__dict__.pop("backend", None)
    app.Task.Strategy = signed_strategy
    app.on_after_finalize.connect(lambda sender=None, **_: _patch_tasks(sender or app), weak=False)
    if app.finalized:
        _patch_tasks(app)
    signals.before_task_publish.connect(_on_before_publish, weak=False, dispatch_uid="edgeledger-sign-meta")
    signals.task_postrun.connect(_on_task_postrun, weak=False, dispatch_uid="edgeledger-replay-done")
    set_refusal_sink(_sink)
    return ctx
