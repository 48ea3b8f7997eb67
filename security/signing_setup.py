"""`setup_signing(app, config)`: make one Celery app sign what it sends and verify what
it receives (tasks, results and control messages, bound to identity and role).

Why (gaps of stock celery.security closed, see security/README.md):
- the task name, id, eta, expires, retry number, routing key and a send timestamp are
  inside the signed payload and must match the message headers and its delivery (no
  replay under a new id, no re-targeting to another task or queue);
- the signer certificate travels in the envelope and must chain to the fleet CA,
  be inside its validity window and not be revoked (CRL), at admission AND right
  before execution;
- the signer's role decides which tasks it may cause (security.policy);
- a task (signer, id, retry) runs once, and only while fresh;
- every refusal is logged, counted by reason, the raw message quarantined, and acked.

Where each part lives: wire format security.codec, checks security.verifier and
security.admission, Celery hooks security.celery_worker, transport refusals
security.dead_letter, per-app state security.app_signing, the process-wide serializer
registry security.serializers. This module only wires them onto an app.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery, signals
from kombu.utils.imports import symbol_by_name

from .admission import Admission
from .app_signing import SigningContext, attach
from .celery_worker import CONSUMER_PATH, delay_limited_amqp, on_task_postrun, patch_tasks, signed_strategy
from .codec import CONTENT_TYPE, Identity
from .dead_letter import DeadLetterRecorder
from .envelope import certificate_pem
from .pki import load_certificate, load_private_key, public_key_der
from .policy import AllOf, Policy, baseline_policy
from .replay import ReplayGuard
from .serializers import PROCESS
from .signing import SigningError
from .signing_config import SigningConfig
from .verifier import Verifier


def _compose(policies: Iterable[Policy | None]) -> Policy:
    chosen = [p for p in policies if p is not None]
    return chosen[0] if len(chosen) == 1 else AllOf(*chosen)


def setup_signing(app: Celery, config: SigningConfig) -> SigningContext:
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
    identity = Identity(key, certificate_pem(cert), lookup_meta=PROCESS.publish_meta.lookup)
    name = PROCESS.register(own.fingerprint, identity, verifier)
    guard = ReplayGuard(config.replay_db, config.max_age_seconds)  # type: ignore[arg-type]
    policy = _compose([baseline_policy(), config.policy])
    ctx = SigningContext(
        config=config, serializer=name, guard=guard, identity=identity, agent_id=own.agent_id,
        verifier=verifier, policy=policy,
        admission=Admission(config=config, verifier=verifier, policy=policy, guard=guard),
    )
    attach(app, ctx)
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
        app.conf.worker_consumer = CONSUMER_PATH
    amqp_base = symbol_by_name(app.amqp_cls)
    if not getattr(amqp_base, "_edgeledger_delay_limit", False):
        app.amqp_cls = delay_limited_amqp(amqp_base)
        app.amqp_cls._edgeledger_delay_limit = True
        app.__dict__.pop("amqp", None)  # built lazily from amqp_cls on next use
    backend = str(app.conf.result_backend or "")
    if config.rpc_reply_exchange and (backend == "rpc" or backend.startswith("rpc://")):
        from .reply_backend import BACKEND_PATH  # imports celery.backends.rpc: only when used

        app.conf.result_backend = BACKEND_PATH
        app._backend_cache = None  # built lazily from conf on next use
        app._local.__dict__.pop("backend", None)
    app.Task.Strategy = signed_strategy
    app.on_after_finalize.connect(lambda sender=None, **_: patch_tasks(sender or app), weak=False)
    if app.finalized:
        patch_tasks(app)
    signals.before_task_publish.connect(PROCESS.publish_meta.on_before_publish, weak=False,
                                        dispatch_uid="edgeledger-sign-meta")
    signals.task_postrun.connect(on_task_postrun, weak=False, dispatch_uid="edgeledger-replay-done")
    return ctx
