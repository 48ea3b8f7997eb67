"""Signature, certificate and freshness checks of one incoming signed message, and the
record of every refusal.

Why an object per app: the trust anchors, CRL, size and age limits and quarantine
are one app's settings (an agent and a coordinator app may share a process), and
the verdict cache must follow that app's CRL. Failures are `SignatureRefused` with a
reason label; `record` logs, counts and quarantines them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from kombu.utils import json as kjson

from . import metrics
from .codec import VerifiedMessage, parse_eta
from .envelope import CertificateCache, check_signature, load_envelope_certificate, parse_envelope
from .quarantine import Quarantine
from .replay import check_fresh
from .signing import SignatureRefused, SignerInfo
from .signing_config import SigningConfig
from .trust import TrustStore

log = logging.getLogger("edgeledger.security")

CACHE_SECONDS = 30.0  # a verified message is decoded 2-3 times in quick succession
CACHE_ENTRIES = 1024


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
        self.certificates = CertificateCache()

    def verify(self, data: bytes | str, max_age: float | None = None) -> VerifiedMessage:
        """Full check (crypto once per distinct message; repeats hit a short-lived cache).
        `max_age`: the freshness bound for this message, default the configured one."""
        max_age = self.max_age if max_age is None else max_age
        raw = data.encode() if isinstance(data, str) else bytes(data)
        digest = hashlib.sha256(raw).hexdigest()
        now = time.time()
        generation = self.trust.crl_generation()
        with self._cache_lock:
            hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < CACHE_SECONDS and hit[1] == generation:
            check_fresh(hit[2].sent_at, max_age, now, hit[2].eta)
            return hit[2]
        env = parse_envelope(raw, self.max_bytes)
        cert = load_envelope_certificate(env.certificate_pem, cache=self.certificates)
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
        check_fresh(sent_at, max_age, now, eta)
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
            cert = load_envelope_certificate(signer.certificate_pem, strict=False, cache=self.certificates)
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

    def decode(self, data: bytes | str) -> Any:
        """kombu decoder: the verified body, or SignatureRefused (recorded here, once)."""
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
