"""Celery apps used by the security tests: a 'coordinator' worker app whose tasks leave
side effects in a SQLite file, and 'agent' publisher apps, all signing for real."""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Connection, Exchange, Producer, Queue

from security.app_signing import ensure_bound
from security.codec import CONTENT_TYPE, META_KEY
from security.codec import Identity as SigningIdentity
from security.envelope import certificate_pem
from security.pki import load_certificate, load_private_key
from security.signing_config import SigningConfig
from security.signing_setup import setup_signing

from .conftest import Identity, SigningPKI


def executed(db: Path) -> list[tuple[str, str, str]]:
    """(task, agent_id, value) rows the tasks wrote: the side effect refusals must not have."""
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    try:
        conn.execute("create table if not exists runs (task text, agent text, value text)")
        return conn.execute("select task, agent, value from runs").fetchall()
    finally:
        conn.close()


def record_run(db: Path, task: str, agent: str, value: str) -> None:
    """The side effect a test task has when it really runs."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        with conn:
            conn.execute("create table if not exists runs (task text, agent text, value text)")
            conn.execute("insert into runs values (?, ?, ?)", (task, agent, value))
    finally:
        conn.close()


@dataclass
class WorkerSide:
    app: Celery
    queue: str
    side_effects: Path
    config: SigningConfig


def signing_config(pki: SigningPKI, ident: Identity, workdir: Path, **kw: Any) -> SigningConfig:
    return SigningConfig(
        key_path=ident.key, cert_path=ident.cert, ca_path=pki.ca_path, crl_path=pki.crl_path,
        replay_db=workdir / f"{ident.name}-replay.sqlite", quarantine_db=workdir / f"{ident.name}-quarantine.sqlite",
        **kw,
    )


def make_worker_app(broker_url: str, pki: SigningPKI, workdir: Path, **cfg: Any) -> WorkerSide:
    """The receiving side: tasks t.record / t.other write a row, t.bound checks identity."""
    queue = f"sec-{uuid.uuid4().hex[:8]}"
    side = workdir / "side-effects.sqlite"
    app = Celery("coord-test", broker=broker_url, backend="rpc://", set_as_current=False)
    app.conf.update(
        task_default_queue=queue, worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
        worker_enable_remote_control=False, task_acks_late=True, result_expires=60,
    )
    config = signing_config(pki, pki.identity("coordinator"), workdir, **cfg)
    setup_signing(app, config)

    @app.task(name="t.record", bind=True, shared=False)
    def record(self, agent_id: str, value: str) -> dict:
        signer = ensure_bound(self.request.signer, agent_id)
        record_run(side, "t.record", agent_id, value)
        return {"agent_id": signer.agent_id, "fingerprint": signer.fingerprint,
                "envelope_digest": signer.envelope_digest}

    @app.task(name="t.other", bind=True, shared=False)
    def other(self, agent_id: str, value: str) -> str:
        record_run(side, "t.other", agent_id, value)
        return "other"

    return WorkerSide(app=app, queue=queue, side_effects=side, config=config)


def make_sender_app(broker_url: str, pki: SigningPKI, ident: Identity, workdir: Path, queue: str) -> Celery:
    app = Celery(f"agent-{ident.name}", broker=broker_url, backend="rpc://", set_as_current=False)
    app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    setup_signing(app, signing_config(pki, ident, workdir))
    return app


def craft(ident: Identity, task: str, args: list, *, task_id: str | None = None,
          meta: dict | None = None, sent_at: float | None = None, drop_meta: bool = False,
          routing_key: str | None = None, kwargs: dict | None = None, embed: dict | None = None,
          headers_override: dict | None = None) -> tuple[dict, bytes]:
    """A protocol-2 task message signed by `ident` with the real encoder: (headers, body).

    routing_key: the queue it is signed for (a worker refuses it on any other queue);
    kwargs / embed / headers_override: added to the body's kwargs, embed and the message headers.
    """
    task_id = task_id or str(uuid.uuid4())
    headers = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
        "root_id": task_id, "parent_id": None, "argsrepr": repr(args), "kwargsrepr": "{}",
        "origin": "test", "ignore_result": True,
    }
    headers.update(headers_override or {})
    signed_meta = {"task": task, "id": task_id, "eta": headers.get("eta"), "expires": None, "retries": 0,
                   "routing_key": routing_key}
    signed_meta.update(meta or {})
    full_embed: dict = {"callbacks": None, "errbacks": None, "chain": None, "chord": None, **(embed or {})}
    if not drop_meta:
        full_embed[META_KEY] = signed_meta
    identity = SigningIdentity(load_private_key(ident.key), certificate_pem(load_certificate(ident.cert)))
    body = identity.encode([args, dict(kwargs or {}), full_embed], sent_at=sent_at)
    return headers, body


def publish_raw(broker_url: str, queue: str, headers: dict, body: bytes,
                content_type: str = CONTENT_TYPE, ssl: dict | None = None) -> None:
    """Put bytes on the worker's queue exactly as given (what an attacker can do)."""
    with Connection(broker_url, ssl=ssl) as conn:
        q = Queue(queue, Exchange(queue), routing_key=queue)
        producer = Producer(conn.channel())
        producer.publish(body, exchange=q.exchange, routing_key=queue, declare=[q], headers=headers,
                         content_type=content_type, content_encoding="binary", serializer=None)
