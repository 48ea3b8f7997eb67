"""Signed-task throughput: stock `celery.security` (RSA-2048) vs edgeledger's signed
serializer (EC P-256, with header binding, chain + CRL checks, replay guard and
quarantine), each through a real Celery worker over a real redis-server; plus the
sign+verify cost per message at the serializer level.

Run: .venv/bin/python bench/signing.py [--tasks 2000] [--rounds 3]

Publish rate = signing side (tasks queued before the worker starts); worker rate =
verifying side (the in-process solo worker drains the queue).

Each variant runs in its own child process (stock celery.security disables other
serializers process-wide), against one redis-server on a free loopback port.
Prints progress, then medians and ratios. Bounded: ~1-2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from _harness import ROOT, start_redis  # first: puts the repository root on sys.path

VARIANTS = ("plain-json", "stock-rsa", "edge-p256")


# ---------------------------------------------------------------- PKI
def make_pki(directory: Path) -> dict[str, str]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from security.pki import CertificateAuthority, generate_key, make_csr, write_pem, write_private_key
    from security.revocation import RevocationStore

    ca = CertificateAuthority.create("bench CA")
    ca.save(directory)
    out: dict[str, str] = {"ca": str(directory / "ca.pem")}
    for name, key in (("edge", generate_key()), ("stock", rsa.generate_private_key(65537, 2048))):
        cert = ca.issue(make_csr(key, f"bench-{name}"))
        write_private_key(key, directory / f"{name}.key")
        store = directory / f"store-{name}"
        store.mkdir()
        write_pem(cert, directory / f"{name}.pem")
        write_pem(cert, store / f"{name}.pem")
        out[f"{name}_key"], out[f"{name}_cert"] = str(directory / f"{name}.key"), str(directory / f"{name}.pem")
        out[f"{name}_store"] = str(store / "*.pem")
    RevocationStore(directory / "revoked.sqlite").write_crl(ca, directory / "crl.pem")
    out["crl"] = str(directory / "crl.pem")
    return out


# ---------------------------------------------------------------- child
def build_app(variant: str, broker: str, pki: dict[str, str], workdir: Path):
    from celery import Celery

    app = Celery(f"bench-{variant}", broker=broker, set_as_current=False)
    app.conf.update(task_default_queue=f"bench-{variant}-{uuid.uuid4().hex[:6]}", task_ignore_result=True,
                    worker_hijack_root_logger=False, worker_enable_remote_control=False,
                    broker_connection_retry_on_startup=True, worker_prefetch_multiplier=8)
    if variant == "stock-rsa":
        app.conf.update(security_key=pki["stock_key"], security_certificate=pki["stock_cert"],
                        security_cert_store=pki["stock_store"], security_digest="sha256",
                        task_serializer="auth", result_serializer="auth", accept_content=["auth"],
                        result_accept_content=["auth"])
        app.setup_security()
    elif variant == "edge-p256":
        from security.signing_config import SigningConfig
        from security.signing_setup import setup_signing

        setup_signing(app, SigningConfig(key_path=Path(pki["edge_key"]), cert_path=Path(pki["edge_cert"]),
                                         ca_path=Path(pki["ca"]), crl_path=Path(pki["crl"]),
                                         replay_db=workdir / "replay.sqlite", quarantine_db=workdir / "q.sqlite"))
    return app


def serializer_cost(variant: str, n: int) -> float:
    """Seconds per message for dumps (sign) + loads (verify) of a typical task body."""
    from kombu.serialization import dumps, loads

    name = {"plain-json": "json", "stock-rsa": "auth", "edge-p256": "edge-signed"}[variant]
    body = ([{"agent_id": "bench-edge", "sensor": "t", "seq": 1, "value": 21.5, "unit": "C",
              "sampled_at": time.time()}], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    start = time.perf_counter()
    for _ in range(n):
        ctype, enc, data = dumps(body, name)
        loads(data, ctype, enc)
    return (time.perf_counter() - start) / n


def run_child(variant: str, broker: str, pki: dict[str, str], tasks: int) -> dict:
    from celery.contrib.testing.worker import start_worker

    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
    app = build_app(variant, broker, pki, workdir)
    done = threading.Event()
    count = [0]

    @app.task(name="bench.ingest", shared=False)
    def ingest(reading: dict) -> None:
        count[0] += 1
        if count[0] >= tasks:
            done.set()

    per_msg = serializer_cost(variant, 300)
    reading = {"agent_id": "bench-edge", "sensor": "t", "seq": 0, "value": 21.5, "unit": "C", "sampled_at": 0.0}
    # Publish everything first (signing side), then let the worker drain the queue
    # (verifying side): publisher and worker do not fight over one GIL.
    start = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for i in range(tasks):
            app.send_task("bench.ingest", kwargs={"reading": dict(reading, seq=i, sampled_at=time.time())},
                          ignore_result=True, producer=producer)
    publish_s = time.perf_counter() - start
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30, loglevel="WARNING"):
        start = time.perf_counter()
        if not done.wait(120):
            raise SystemExit(f"{variant}: only {count[0]}/{tasks} tasks ran within 120 s")
        drain_s = time.perf_counter() - start
    shutil.rmtree(workdir, ignore_errors=True)
    return {"variant": variant, "tasks_per_s": tasks / drain_s, "publish_per_s": tasks / publish_s,
            "sign_verify_us": per_msg * 1e6}


# ---------------------------------------------------------------- parent
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--pki", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.broker, json.loads(args.pki), args.tasks)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-signing-"))
    redis, broker = start_redis()
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    try:
        pki = make_pki(tmp)
        print(f"signing bench: {args.tasks} tasks x {args.rounds} rounds per variant, redis {broker}, solo worker",
              flush=True)
        for rnd in range(1, args.rounds + 1):
            for variant in VARIANTS:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", variant, "--broker", broker, "--pki", json.dumps(pki),
                     "--tasks", str(args.tasks)],
                    capture_output=True, text=True, timeout=170, cwd=ROOT,
                )
                if out.returncode != 0:
                    raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[variant].append(res)
                print(f"  round {rnd} {variant:11s} publish {res['publish_per_s']:7.0f}/s   "
                      f"worker {res['tasks_per_s']:7.0f} tasks/s   "
                      f"sign+verify {res['sign_verify_us']:7.1f} us/msg", flush=True)
    finally:
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("tasks_per_s", "publish_per_s", "sign_verify_us")}
           for v, rs in results.items()}
    print("\nmedians:")
    for v in VARIANTS:
        print(f"  {v:11s} publish {med[v]['publish_per_s']:7.0f}/s   worker {med[v]['tasks_per_s']:7.0f} tasks/s   "
              f"sign+verify {med[v]['sign_verify_us']:7.1f} us/msg")
    stock, edge, plain = med["stock-rsa"], med["edge-p256"], med["plain-json"]
    print("\nratios (edge-p256 vs stock celery.security RSA-2048):")
    print(f"  publish (signing) rate  edge/stock = {edge['publish_per_s'] / stock['publish_per_s']:.2f}x")
    print(f"  worker (verifying) rate edge/stock = {edge['tasks_per_s'] / stock['tasks_per_s']:.2f}x")
    print(f"  sign+verify per message stock/edge = {stock['sign_verify_us'] / edge['sign_verify_us']:.2f}x faster")
    print(f"  worker rate vs unsigned json: stock {stock['tasks_per_s'] / plain['tasks_per_s']:.2f}x, "
          f"edge {edge['tasks_per_s'] / plain['tasks_per_s']:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
