"""A minimal signed publisher standing in for an agent: tests, benchmarks, demo fallback.

Why here and not `agent/`: the coordinator's crash and throughput tests need a
deterministic stream (exact seq numbers, a known count, no sampling schedule), and the
demo must still run if the real agent cannot start. It signs with an enrollment
bundle's identity exactly like an agent does and speaks only the documented task
names and payloads (docs/INTERFACES.md); it never imports `agent`.

    python -m coordinator.simagent --bundle DIR --count 2000 [--interval 0] [--start-seq 1]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from celery import Celery

from kombu_mqtt.backoff import Backoff
from security.contract import (
    HEARTBEAT_TASK,
    INGEST_QUEUE,
    INGEST_TASK,
    heartbeat_task_id,
    reading_task_id,
)

#: Exit status when the broker refuses this identity for good (revoked / not authorized):
#: the same code as `edge-agent run` (EX_CONFIG), so supervisors do not restart it.
EXIT_REFUSED = 78


class Refused(Exception):
    """The broker refused this identity; retrying cannot fix it (security.refusal)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class SimAgent:
    """Publishes signed edge.ingest / edge.heartbeat tasks as the bundle's identity."""

    def __init__(self, bundle: Path, broker_url: str | None = None, reconnect_timeout: float = 60.0, retries: int = 20) -> None:
        from coordinator.celery_app import require_mqtt_transport
        from security.signing_config import SigningConfig
        from security.signing_setup import setup_signing

        require_mqtt_transport()
        bundle = Path(bundle)
        conf = tomllib.loads((bundle / "agent.toml").read_text())
        self.agent_id: str = conf["agent_id"]
        url = broker_url or conf["broker_url"]
        self.broker_url = url
        self.tls: tuple[str, str, str] | None = (
            str(bundle / conf.get("ca_file", "ca.pem")),
            str(bundle / conf.get("cert_file", f"{self.agent_id}.pem")),
            str(bundle / conf.get("key_file", f"{self.agent_id}.key")),
        ) if url.startswith("mqtts") else None
        self.app = Celery(f"sim-{self.agent_id}", broker=url, set_as_current=False)
        self.app.conf.update(
            broker_use_ssl={
                "ca_certs": str(bundle / conf.get("ca_file", "ca.pem")),
                "certfile": str(bundle / conf.get("cert_file", f"{self.agent_id}.pem")),
                "keyfile": str(bundle / conf.get("key_file", f"{self.agent_id}.key")),
            } if url.startswith("mqtts") else None,
            # max_retries=1: kombu's own reconnect loop would otherwise retry forever (the
            # transport already retries for reconnect_timeout); send() decides what to retry.
            broker_transport_options={"publish_timeout": 15.0, "reconnect_timeout": reconnect_timeout, "max_retries": 1},
            task_ignore_result=True,
            task_publish_retry=False,  # send() retries itself, and stops on a broker refusal
        )
        setup_signing(
            self.app,
            SigningConfig(
                key_path=bundle / conf.get("key_file", f"{self.agent_id}.key"),
                cert_path=bundle / conf.get("cert_file", f"{self.agent_id}.pem"),
                ca_path=bundle / conf.get("ca_file", "ca.pem"),
                replay_db=bundle / "sim-replay.sqlite",
                quarantine_db=bundle / "sim-quarantine.sqlite",
            ),
        )
        self.rng = random.Random(self.agent_id)
        self.retries = max(1, retries)

    def reading(self, seq: int) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id, "sensor": "temp", "seq": seq,
            "value": round(20 + 5 * self.rng.random(), 3), "unit": "C", "sampled_at": time.time(),
        }

    def send(self, name: str, kwargs: dict[str, Any], task_id: str) -> str:
        """Publish one task (QoS 1, PUBACK awaited); retry the same id while the broker is away.

        task_id: the contract's id for this message (the coordinator refuses any other).
        """
        retries = self.retries
        backoff = Backoff(0.2, 2.0)  # jittered: a thousand simulated agents must not retry in step
        for attempt in range(retries):
            try:
                self.app.send_task(name, kwargs=kwargs, queue=INGEST_QUEUE, task_id=task_id)
                return task_id
            except Exception as exc:
                from security.refusal import broker_refusal, probe_certificate

                reason = broker_refusal(exc)
                if reason is None and self.tls is not None:  # TLS 1.3 hides the alert: ask directly
                    reason = probe_certificate(self.broker_url, *self.tls, timeout=2.0)
                if reason is not None:  # revoked / removed from the broker: stop, do not retry forever
                    raise Refused(reason) from exc
                if attempt == retries - 1:
                    raise
                time.sleep(backoff.next())
        return task_id

    def ingest(self, seq: int) -> str:
        return self.send(INGEST_TASK, {"reading": self.reading(seq)}, reading_task_id(self.agent_id, seq))

    def heartbeat(self, backlog: int = 0, interval: float = 0.0) -> str:
        sent_at = time.time()
        return self.send(HEARTBEAT_TASK, {"status": {
            "agent_id": self.agent_id, "outbox_backlog": backlog, "interval": interval,
            "version": "sim", "sent_at": sent_at}}, heartbeat_task_id(self.agent_id, sent_at))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coordinator.simagent", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="enrollment bundle dir (edge-coordinator enroll --bundle)")
    p.add_argument("--broker-url", help="override the bundle's broker_url")
    p.add_argument("--count", type=int, default=100, help="readings to send (0: until --duration ends)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run when --count is 0")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between readings (a schedule: one every INTERVAL on average)")
    p.add_argument("--start-seq", type=int, default=1)
    p.add_argument("--heartbeat-every", type=int, default=0, help="send a heartbeat every N readings")
    p.add_argument("--retries", type=int, default=20, help="attempts per task while the broker is away")
    p.add_argument("--reconnect-timeout", type=float, default=60.0, help="seconds one attempt may spend reconnecting")
    p.add_argument("--progress", type=Path, help="file to which the last sent seq is written")
    args = p.parse_args(argv)
    sim = SimAgent(args.bundle, args.broker_url, reconnect_timeout=args.reconnect_timeout, retries=args.retries)
    start = time.monotonic()
    seq, sent, end = args.start_seq, 0, start + args.duration
    refused: str | None = None
    try:
        while (args.count and sent < args.count) or (not args.count and time.monotonic() < end):
            sim.ingest(seq)
            sent += 1
            if args.heartbeat_every and sent % args.heartbeat_every == 0:
                sim.heartbeat(interval=args.interval)
            if args.progress and sent % 50 == 0:
                args.progress.write_text(str(seq))
            seq += 1
            if args.interval:  # on a schedule: the time a publish takes does not lower the rate
                lag = time.monotonic() - (start + sent * args.interval)
                if lag > 1.0:  # after a stall (broker away): go on from now, no catch-up burst
                    start += lag
                time.sleep(max(0.0, -lag))
    except KeyboardInterrupt:
        pass
    except Refused as exc:
        from security.refusal import describe

        refused = exc.reason
        print(f"simagent {sim.agent_id}: {describe(exc.reason)}; stopping", file=sys.stderr, flush=True)
    if args.progress:
        args.progress.write_text(str(seq - 1))
    summary = {"agent_id": sim.agent_id, "sent": sent, "last_seq": seq - 1}
    if refused:
        summary["refused"] = refused
    print(json.dumps(summary), flush=True)
    return EXIT_REFUSED if refused else 0


if __name__ == "__main__":
    sys.exit(main())
