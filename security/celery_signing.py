"""Signed Celery messages: tasks, results and control messages, bound to identity and role.

Why (gaps of stock celery.security closed here, see security/README.md):
- the task name, id, eta, expires, retry number, routing key and a send timestamp are
  inside the signed payload and must match the message headers and its delivery (no
  replay under a new id, no re-targeting to another task or queue);
- the signer certificate travels in the envelope and must chain to the fleet CA,
  be inside its validity window and not be revoked (CRL), at admission AND right
  before execution (a task waiting for its eta does not outlive a revocation);
- the signer's role decides which tasks it may cause (security.policy): no Celery
  built-ins, no callbacks or canvas, agents only their own contract ids;
- the signer is exposed to the task as `self.request.signer`;
- a task (signer, id, retry) runs once, and only while fresh (a delayed task is fresh
  until eta + max_age; an eta beyond max_delay_seconds is refused when sent and received);
- every refusal (also unknown task names and messages that are not tasks) is logged,
  counted by reason, the raw message quarantined, and acked;
- the crypto runs once per message (the consumer verifies; the execution path runs
  on the body it verified).

Hook points: a kombu serializer (`edge-signed`), the `before_task_publish` signal
(copies header fields into the signed body), an AMQP subclass (refuses a too-far eta
at send time), a consumer strategy installed on every task (admission before Celery
builds a Request), a Request class (signer re-checked before execution, results
never turned on by a header) and a Consumer class (refusals Celery would only log).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery, Task, signals
from celery.worker.consumer.consumer import Consumer
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy
from kombu.serialization import register as register_serializer
from kombu.utils import json as kjson
from kombu.utils.imports import symbol_by_name

from . import contract, metrics
from .envelope import (
    certificate_pem,
    check_signature,
    load_envelope_certificate,
    parse_envelope,
    sign_envelope,
)
from .pki import PrivateKey, load_certificate, load_private_key, public_key_der
from .policy import BUILTIN_PREFIX, CANVAS_EMBED_FIELDS, AllOf, Policy, TaskMessage, baseline_policy
from .quarantine import Quarantine
from .replay import ReplayGuard, check_fresh
from .signing import SignatureRefused, SignerInfo, SigningError
from .trust import TrustStore

log = logging.getLogger("edgeledger.security")

SERIALIZER = "edge-signed"
CONTENT_TYPE = "application/x-edge-signed"
META_KEY = "__edge_meta__"
SIGNED_HEADERS = ("task", "id", "eta", "expires", "retries")
CACHE_SECONDS = 30.0  # a verified message is decoded 2-3 times in quick succession
CACHE_ENTRIES = 1024
EMBED_FIELDS = frozenset({"callbacks", "errbacks", "chain", "chord", *CANVAS_EMBED_FIELDS})
_CTX_ATTR = "_edgeledger_signing"  # where an app keeps its _AppContext


@dataclass
class SigningConfig:
    """Where this process's identity and trust anchors live, the refusal limits, and
    the role policy of the tasks this app consumes."""

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
    policy: Policy | None = None  # role policy (security.policy); always on top of the baseline
    max_delay_seconds: float = 86400.0  # eta/countdown limit, checked when sent and when received
    # Tasks whose consumer dedupes by task id (the coordinator's journal): a NEW envelope
    # under an accepted id is a sender's re-send, let through; the same envelope twice
    # stays a `replay` (security.replay). Empty: every id is accepted once.
    resend_tasks: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.key_path, self.cert_path, self.ca_path = Path(self.key_path), Path(self.cert_path), Path(self.ca_path)
        self.crl_path = Path(self.crl_path) if self.crl_path else None
        base = self.key_path.parent
        self.replay_db = Path(self.replay_db) if self.replay_db else base / "replay.sqlite"
        self.quarantine_db = Path(self.quarantine_db) if self.quarantine_db else base / "quarantine.sqlite"
        if self.allowed_signers is not None:
            self.allowed_signers = frozenset(self.allowed_signers)
        if self.max_age_seconds <= 0 or self.max_message_bytes <= 0 or self.max_delay_seconds < 0:
            raise SigningError("max_age_seconds and max_message_bytes must be positive, max_delay_seconds not negative")


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


class Verifier:
    """The checks every incoming signed message goes through, with one app's settings.

    Holds its own verdict cache: a verdict is reused only while the CRL it was reached
    under is still the current one (the trust store's CRL generation).
    """

    def __init__(self, config: SigningConfig) -> None:
        self.config = config
        self.trust = TrustStore(config.ca_path, config.crl_path)
        self.quarantine = Quarantine(config.quarantine_db)  # type: ignore[arg-type]
        self.max_bytes = config.max_message_bytes
        self.max_age = config.max_age_seconds
        self._cache: OrderedDict[str, tuple[float, int, VerifiedMessage]] = OrderedDict()
        self._cache_lock = threading.Lock()

    def verify(self, data: bytes | str) -> VerifiedMessage:
        """Full check (crypto once per distinct message; repeats hit a short-lived cache)."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        digest = hashlib.sha256(raw).hexdigest()
        now = time.time()
        generation = self.trust.crl_generation()
        with self._cache_lock:
            hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < CACHE_SECONDS and hit[1] == generation:
            check_fresh(hit[2].sent_at, self.max_age, now, hit[2].eta)
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
        eta = parse_eta(meta.get("eta")) if kind == "task" and meta else None
        check_fresh(sent_at, self.max_age, now, eta)
        signer = SignerInfo(
            agent_id=trusted.agent_id, fingerprint=trusted.fingerprint, envelope_digest=digest,
            envelope=raw, certificate_pem=trusted.certificate_pem,
        )
        vm = VerifiedMessage(kind=kind, sent_at=sent_at, meta=meta, payload=env.payload, signer=signer, eta=eta)
        with self._cache_lock:
            self._cache[digest] = (now, generation, vm)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        metrics.ACCEPTED.inc(kind)
        return vm

    def recheck_signer(self, signer: SignerInfo | None) -> SignatureRefused | None:
        """The signer's certificate against the CURRENT CRL and validity window (the
        chain verdict is cached per certificate, so this is a stat and a set lookup)."""
        if signer is None:
            return SignatureRefused("unsigned", "request carries no verified signer")
        try:
            cert = load_envelope_certificate(signer.certificate_pem, strict=False)
            self.trust.validate(cert, cache_key=signer.certificate_pem)
        except SignatureRefused as exc:
            return exc
        return None

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
        except Exception:
            log.exception("could not write refused message to quarantine %s", self.quarantine.path)

    # kombu decoder -------------------------------------------------------
    def decode(self, data: bytes | str) -> Any:
        try:
            vm = self.verify(data)
        except SignatureRefused as exc:
            self.record(exc, data)
            raise
        except Exception as exc:
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


@dataclass(frozen=True)
class Delivery:
    """How a message reached this worker: the routing key it was delivered with and the
    names/routing keys of the queues this worker consumes (empty: not known)."""

    routing_key: str | None
    queues: frozenset[str] = frozenset()


def replay_key(signer: str, task_id: Any, retries: Any) -> str:
    """Replay-guard key: per signer, so one signer's messages never block another's ids."""
    return f"{signer}/{task_id}:{retries or 0}"


@dataclass
class _AppContext:
    """Everything signing keeps for one app (held on the app itself, nothing global)."""

    config: SigningConfig
    serializer: str
    guard: ReplayGuard
    identity: _Identity
    agent_id: str
    verifier: Verifier
    policy: Policy

    def admit(self, headers: dict[str, Any], body: bytes | str, content_type: str | None,
              delivery: Delivery | None = None) -> VerifiedMessage | None:
        """Every check an incoming task message must pass, in order; None when refused.

        A refusal is logged, counted and quarantined here, once.
        """
        signer_id: str | None = None
        try:
            if content_type != CONTENT_TYPE:
                raise SignatureRefused("unsigned", f"content type {content_type!r} is not {CONTENT_TYPE}")
            vm = self.verifier.verify(body)
            signer_id = vm.signer.agent_id
            check_binding(vm, headers)
            args, kwargs, embed = _task_body(vm)
            allowed = self.config.allowed_signers
            if allowed is not None and signer_id not in allowed:
                raise SignatureRefused("signer_not_allowed", f"{signer_id!r} may not send tasks to this worker")
            if delivery is not None:
                check_routing(vm, delivery)
            self.check_delay(vm)
            refusal = self.policy.check(TaskMessage(
                task=str(headers.get("task")), task_id=str(headers.get("id")), signer=signer_id,
                args=tuple(args), kwargs=kwargs, embed=embed, headers=headers, sent_at=vm.sent_at, eta=vm.eta,
            ))
            if refusal is not None:
                raise SignatureRefused(refusal.reason, refusal.detail)
            self.guard.accept(replay_key(signer_id, headers.get("id"), headers.get("retries")),
                              vm.signer.envelope_digest, vm.sent_at, signer_id, eta=vm.eta,
                              allow_resend=str(headers.get("task")) in self.config.resend_tasks)
        except SignatureRefused as exc:
            self.verifier.record(exc, body, headers=headers, signer=signer_id)
            return None
        except Exception as exc:
            log.exception("signature check failed unexpectedly")
            self.verifier.record(SignatureRefused("check_error", repr(exc)), body, headers=headers, signer=signer_id)
            return None
        return vm

    def check_delay(self, vm: VerifiedMessage) -> None:
        limit = self.config.max_delay_seconds
        if vm.eta is not None and vm.eta - vm.sent_at > limit:
            raise SignatureRefused(
                "eta_too_far", f"eta is {vm.eta - vm.sent_at:.0f}s after sending; limit max_delay_seconds={limit:g}"
            )

    def check_send_delay(self, task: str, eta_header: Any) -> None:
        """Refuse to send what the receiver would refuse as `eta_too_far`."""
        eta = parse_eta(eta_header) if eta_header else None
        limit = self.config.max_delay_seconds
        if eta is not None and eta - time.time() > limit:
            raise SigningError(
                f"task {task} is scheduled {eta - time.time():.0f}s ahead (eta {eta_header}), beyond "
                f"max_delay_seconds={limit:g}: receivers refuse it as eta_too_far. Schedule it at most {limit:g}s "
                "ahead (re-send later), or raise max_delay_seconds in the SigningConfig of sender and receiver"
            )


def signing_context(app: Celery | None) -> _AppContext | None:
    """The signing state of `app`, or None when setup_signing was not called for it."""
    return getattr(app, _CTX_ATTR, None) if app is not None else None


class _ProcessSigning:
    """What is process-wide because kombu's serializer registry is: one serializer name
    per signing identity, and the verifier for decodes that come with no app (rpc://
    results, control replies): the last app set up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.serializers: dict[str, str] = {}  # certificate fingerprint -> serializer name
        self.default_verifier: Verifier | None = None

    def serializer_for(self, fp: str, identity: _Identity, verifier: Verifier) -> str:
        with self.lock:
            name = self.serializers.get(fp) or (SERIALIZER if not self.serializers else f"{SERIALIZER}-{fp[:12]}")
            self.serializers[fp] = name
            self.default_verifier = verifier
            register_serializer(name, identity.encode, _decode, content_type=CONTENT_TYPE, content_encoding="binary")
        return name


_PROCESS = _ProcessSigning()


def get_verifier(app: Celery | None = None) -> Verifier:
    """The verifier of `app`, or the process default (the last app set up) for decodes
    that come with no app (results, control replies)."""
    ctx = signing_context(app)
    if ctx is not None:
        return ctx.verifier
    if _PROCESS.default_verifier is None:
        raise SigningError("signing is not set up: call security.celery_signing.setup_signing(app, config) first")
    return _PROCESS.default_verifier


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
    if sender is None or task_id is None:
        return
    ctx = signing_context(sender.app)
    signer = getattr(sender.request, "signer", None)
    if ctx is None or signer is None:
        return
    try:
        ctx.guard.mark_done(replay_key(signer.agent_id, task_id, sender.request.retries))
    except Exception:
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


def check_routing(vm: VerifiedMessage, delivery: Delivery) -> None:
    """The signed routing key must be the one the message was delivered with, and name a
    queue this worker consumes (a message signed for agent B's queue cannot be replayed
    into agent C's, nor a command into the ingest queue)."""
    signed = (vm.meta or {}).get("routing_key")
    if not signed:
        raise SignatureRefused("routing_key_mismatch", "message was signed without a routing key")
    if signed != delivery.routing_key:
        raise SignatureRefused(
            "routing_key_mismatch", f"signed for routing key {signed!r}, delivered with {delivery.routing_key!r}"
        )
    if delivery.queues and signed not in delivery.queues:
        raise SignatureRefused(
            "routing_key_mismatch", f"signed for {signed!r}; this worker consumes {', '.join(sorted(delivery.queues))}"
        )


def _task_body(vm: VerifiedMessage) -> tuple[list, dict, dict]:
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


def admit(app: Celery, headers: dict[str, Any], body: bytes | str, content_type: str | None,
          delivery: Delivery | None = None) -> VerifiedMessage | None:
    """Every check an incoming task message must pass, in order; None when refused.

    delivery: how the message arrived (the worker always passes it; without it the
    routing-key check is skipped, for unit tests of the other checks).
    """
    ctx = signing_context(app)
    if ctx is None:
        raise SigningError("setup_signing was not called for this app")
    return ctx.admit(headers, body, content_type, delivery)


def _consumed(consumer: Any) -> frozenset[str]:
    task_consumer = getattr(consumer, "task_consumer", None)
    names: set[str] = set()
    for queue in getattr(task_consumer, "queues", None) or ():
        names.update(n for n in (queue.name, queue.routing_key) if n)
    return frozenset(names)


def signed_strategy(task: Task, app: Celery, consumer: Any, **kwargs: Any):
    """Consumer strategy: verify + bind + policy + replay-check before Celery builds a
    Request, which then runs on the verified body (SignedRequest)."""
    if signing_context(app) is None:
        raise SigningError(f"task {task.name} uses signed_strategy but setup_signing was not called for its app")
    if not (isinstance(task.Request, type) and issubclass(task.Request, SignedRequest)):
        task.Request = SignedRequest
    inner = default_strategy(task, app, consumer, **kwargs)
    connection_errors = consumer.connection_errors

    def handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        info = message.delivery_info or {}
        delivery = Delivery(routing_key=info.get("routing_key"), queues=_consumed(consumer))
        vm = admit(app, dict(message.headers or {}), message.body, message.content_type, delivery)
        if vm is None:
            # Kept in quarantine; acking stops the broker from redelivering it forever.
            ack(log, connection_errors)
            return None
        message._decoded_cache = vm.body()  # the Request runs on exactly what was verified
        return inner(message, body, ack, reject, callbacks, **kw)

    return handler


class SignedRequest(Request):
    """A Request of a message `admit` let through.

    - runs on the body admit verified (no second decode through the process-wide
      serializer registry, whose settings may be another app's);
    - a task declared ignore_result stays so whatever the message headers say (an
      `ignore_result: false` header plus `reply_to` would make the worker publish a
      result where the sender chose);
    - `revoked()`, which Celery calls right before execution (also for eta and
      rate-limited tasks leaving the timer), re-checks the signer against the current
      CRL: nothing from a signer revoked meanwhile runs.
    """

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        payload = self._payload
        embed = payload[2] if isinstance(payload, (list, tuple)) and len(payload) == 3 else {}
        self._edge_signer: SignerInfo | None = embed.get("signer") if isinstance(embed, dict) else None
        self._body = tuple(payload)
        self._decoded = True
        self._content_type = self._content_encoding = None
        if self._task.ignore_result:
            self._ignore_result = True
            self._request_dict["ignore_result"] = True

    def revoked(self) -> bool:
        if super().revoked():
            return True
        ctx = signing_context(self._app)
        refusal = (ctx.verifier.recheck_signer(self._edge_signer) if ctx is not None
                   else SignatureRefused("check_error", "signing context of this app is gone"))
        if refusal is None:
            return False
        signer = self._edge_signer
        verifier = ctx.verifier if ctx is not None else get_verifier()
        refusal = SignatureRefused(refusal.reason, f"{refusal.detail} (re-checked right before execution)")
        verifier.record(refusal, signer.envelope if signer else None, headers={"id": self.id, "task": self.name},
                        signer=signer.agent_id if signer else None)
        self._announce_revoked(refusal.reason, False, None, False)  # acks, never runs
        return True


class SignedConsumer(Consumer):
    """Consumer that keeps what stock Celery only logs: unknown task names, messages
    without a task header, invalid tasks and undecodable messages are quarantined,
    counted and acked. Unknown tasks get no failure result (stock Celery publishes one
    to the message's own reply_to)."""

    def update_strategies(self) -> None:
        _patch_tasks(self.app)
        super().update_strategies()

    def _refuse(self, reason: str, detail: str, message: Any) -> None:
        try:
            headers = dict(message.headers or {})
        except (TypeError, ValueError):
            headers = {}
        get_verifier(self.app).record(SignatureRefused(reason, detail), message.body, headers=headers)
        message.ack_log_error(log, self.connection_errors)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse("not_a_task", "message has no task header and is not a task", message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = message.headers.get("task") if isinstance(message.headers, dict) else None
        if isinstance(name, str) and (name.startswith(BUILTIN_PREFIX) or contract.is_fleet_task(name)):
            # a fleet task of another role (e.g. an agent command sent to the ingest queue)
            self._refuse("task_not_allowed", f"{name!r} is not a task this worker runs for any signer", message)
        else:
            self._refuse("unknown_task", f"task {name!r} is not registered on this worker", message)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._refuse("malformed", f"invalid task message: {exc}", message)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        cause = exc.args[0] if exc.args else None
        if isinstance(exc, SignatureRefused) or isinstance(cause, SignatureRefused) or isinstance(
                exc.__cause__, SignatureRefused):
            message.ack_log_error(log, self.connection_errors)  # recorded by the decoder already
            return
        self._refuse("not_a_task", f"message without a task header could not be decoded: {exc}", message)


class DeadLetterRecorder:
    """The MQTT transport's `dead_letter_handler` (kombu_mqtt): payloads it refuses to
    deliver (not kombu messages, messages of a stale subscription) are kept in this
    app's quarantine and counted, like every other refusal; not kombu messages as
    `not_a_task`, the others under the transport's reason. Never raises, so the
    transport acks them."""

    NOT_KOMBU = "not_a_kombu_message"  # kombu_mqtt.deadletter.NOT_KOMBU_MESSAGE

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    def __json__(self) -> str:
        """How `celery inspect stats` shows it (the worker reports its transport options)."""
        return f"{__name__}.DeadLetterRecorder"

    def __call__(self, queue: str, topic: str, payload: bytes, reason: str) -> None:
        label = "not_a_task" if reason == self.NOT_KOMBU else str(reason)
        detail = f"the transport refused a message on {topic!r} for queue {queue!r}: {reason}"
        self.verifier.record(SignatureRefused(label, detail), bytes(payload), headers={})


def _delay_limited_amqp(base: type) -> type:
    """The app's AMQP class, refusing at send time an eta the receivers would refuse."""

    class SignedAMQP(base):
        def as_task_v2(self, task_id: str, name: str, *args: Any, **kwargs: Any) -> Any:
            message = super().as_task_v2(task_id, name, *args, **kwargs)
            ctx = signing_context(self.app)
            if ctx is not None:
                ctx.check_send_delay(name, message.headers.get("eta"))
            return message

    SignedAMQP.__qualname__ = f"SignedAMQP[{base.__name__}]"
    return SignedAMQP


def _patch_tasks(app: Celery) -> None:
    for task in app.tasks.values():
        task.Strategy = signed_strategy


def record_for_current_task(exc: SignatureRefused, signer: SignerInfo | None) -> None:
    """Record a refusal raised inside a running task (security.signing.ensure_bound) with
    the settings of that task's app (the process default outside a task)."""
    from celery._state import get_current_task

    headers: dict[str, Any] = {}
    task = get_current_task()
    ctx = None
    if task is not None and task.request is not None and task.request.id:
        headers = {"id": task.request.id, "task": task.name}
        ctx = signing_context(task.app)
    verifier = ctx.verifier if ctx is not None else _PROCESS.default_verifier
    if verifier is None:
        log.warning("refused message: %s", exc)
        return
    verifier.record(exc, signer.envelope if signer else None, headers=headers,
                    signer=signer.agent_id if signer else None)


def _compose(policies: Iterable[Policy | None]) -> Policy:
    chosen = [p for p in policies if p is not None]
    return chosen[0] if len(chosen) == 1 else AllOf(*chosen)


def setup_signing(app: Celery, config: SigningConfig) -> _AppContext:
    """Make `app` sign everything it sends and verify everything it receives.

    Tasks are checked with the consuming app's own settings and policy (the baseline,
    no built-ins and no canvas, always applies). Decodes that come without an app
    (rpc:// results, control replies) use the last app set up in the process. The
    signing identity is per app, so an agent and a coordinator app can live in one
    process (tests, demos) each signing as itself. Call it before the worker starts.
    """
    key = load_private_key(config.key_path)
    cert = load_certificate(config.cert_path)
    if public_key_der(cert.public_key()) != public_key_der(key.public_key()):
        raise SigningError(f"certificate {config.cert_path} does not match key {config.key_path}: re-enroll")
    verifier = Verifier(config)
    own = verifier.trust.validate(cert)  # refuse to start with a certificate nobody would accept
    identity = _Identity(key, certificate_pem(cert))
    name = _PROCESS.serializer_for(own.fingerprint, identity, verifier)
    ctx = _AppContext(
        config=config, serializer=name, guard=ReplayGuard(config.replay_db, config.max_age_seconds),  # type: ignore[arg-type]
        identity=identity, agent_id=own.agent_id, verifier=verifier,
        policy=_compose([baseline_policy(), config.policy]),
    )
    setattr(app, _CTX_ATTR, ctx)
    app.conf.update(
        task_serializer=name, result_serializer=name,
        accept_content=[CONTENT_TYPE], result_accept_content=[CONTENT_TYPE],
        event_serializer="json",
    )
    transport_options = dict(app.conf.broker_transport_options or {})
    if "dead_letter_handler" not in transport_options:  # used by kombu_mqtt, ignored elsewhere
        transport_options["dead_letter_handler"] = DeadLetterRecorder(verifier)
        app.conf.broker_transport_options = transport_options
    if str(app.conf.worker_consumer or "") in ("", "celery.worker.consumer:Consumer"):
        app.conf.worker_consumer = f"{__name__}:SignedConsumer"
    amqp_base = symbol_by_name(app.amqp_cls)
    if not getattr(amqp_base, "_edgeledger_delay_limit", False):
        app.amqp_cls = _delay_limited_amqp(amqp_base)
        app.amqp_cls._edgeledger_delay_limit = True
        app.__dict__.pop("amqp", None)  # built lazily from amqp_cls on next use
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
    return ctx
