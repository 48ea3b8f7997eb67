"""The `edge-agent` command: keygen, enroll, run, status, doctor, renew.

Why so few commands: a device operator makes a key, installs what the coordinator
signed, and runs; `status` answers "is it working" from local files without the broker.
Errors print one line (`edge-agent: <cause>: <fix>`) and exit 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from security import exit_codes

from .config import AgentConfig, load_config
from .errors import AgentError, corrupt_file


def _config(args: argparse.Namespace, **overrides: Any) -> AgentConfig:
    return load_config(args.data_dir, overrides=overrides)


def local_databases(cfg: AgentConfig) -> tuple[Path, Path]:
    """The SQLite files the agent writes: outbox and quarantine."""
    return cfg.outbox_file, cfg.data_dir / "quarantine.sqlite"


def check_local_files(cfg: AgentConfig, at_start: bool = False) -> None:
    """The outbox (and quarantine) must be readable SQLite before anything opens them.

    `status` runs the full integrity check; `run` (at_start) the start-up check of
    ledger.sqlite_files, which scans the whole file only after an unclean stop (a full
    scan at every start grows with the outbox and delays every restart)."""
    from ledger.sqlite_files import unreadable_at_start, unreadable_reason

    check = unreadable_at_start if at_start else unreadable_reason
    for path in local_databases(cfg):
        reason = check(path)
        if reason is not None:
            raise corrupt_file(path, reason)


def mark_clean_stop(cfg: AgentConfig) -> None:
    """After the worker stopped in order: the next start may skip the full scan."""
    from ledger.sqlite_files import mark_clean_stop as mark

    for path in local_databases(cfg):
        mark(path)


def cmd_keygen(args: argparse.Namespace) -> int:
    from .identity import keygen

    cfg = _config(args)
    agent_id = args.id or cfg.agent_id
    if not agent_id:
        raise AgentError("keygen needs an agent id: `edge-agent keygen --id NAME`")
    csr = keygen(cfg, agent_id, force=args.force)
    print(f"key: {cfg.key_file} (0600)\ncsr: {csr}\nnext: have the coordinator sign it "
          f"(`edge-coordinator enroll {csr}`), then `edge-agent enroll --bundle DIR`")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from .identity import enroll

    cfg = _config(args)
    if args.bundle is None and (args.cert is None or args.ca is None):
        raise AgentError("enroll needs --cert FILE --ca FILE, or --bundle DIR")
    cert = enroll(cfg, cert_path=args.cert, ca_path=args.ca, crl_path=args.crl, bundle=args.bundle,
                  broker_url=args.broker_url)
    print(f"enrolled {cfg.cert_file} (valid until {cert.not_valid_after_utc:%Y-%m-%d}); next: `edge-agent run`")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .lazy import defer_unused
    from .memory import limit_arenas

    defer_unused()  # before celery/paho are imported (see agent.lazy)
    limit_arenas()  # before any thread starts (see agent.memory)
    cfg = _config(args, broker_url=args.broker_url, interval=args.interval, log_level=args.log_level)
    cfg.validate_for_run()
    from .identity import require_certificate_identity

    require_certificate_identity(cfg)
    check_local_files(cfg, at_start=True)
    from .revocation import EXIT_REVOKED, FIX, AgentRevoked, refuse_if_revoked

    try:
        refuse_if_revoked(cfg)
    except AgentRevoked as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_REVOKED
    from .app import create_app, start_worker

    started = time.monotonic()
    app = create_app(cfg)  # `--interval` beats a stored set_interval one (cfg.interval_after_stored)

    def ready(**_: Any) -> None:
        print(f"edge-agent {cfg.agent_id} ready in {time.monotonic() - started:.2f}s: consuming {cfg.queue}",
              file=sys.stderr, flush=True)

    code = start_worker(app, cfg, on_ready=ready)
    if code == 0 or app.edge_runtime.revoked is not None:
        mark_clean_stop(cfg)
    if app.edge_runtime.revoked is not None:
        print(f"edge-agent: this device is revoked ({app.edge_runtime.revoked['detail']}): {FIX}", file=sys.stderr, flush=True)
        return EXIT_REVOKED
    return code


def _fmt_time(ts: float | None) -> str:
    if ts is None:
        return "never"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def collect_status(cfg: AgentConfig) -> dict[str, Any]:
    """Local state only: config, certificate, outbox. Works with the broker down."""
    from .identity import certificate_summary, crl_summary
    from .revocation import revoked_state

    out: dict[str, Any] = {
        "agent_id": cfg.agent_id or None,
        "data_dir": str(cfg.data_dir),
        "broker_url": cfg.broker_url or None,
        "key": cfg.key_file.exists(),
        "certificate": certificate_summary(cfg),
        "crl": crl_summary(cfg),
        "revoked": revoked_state(cfg),
    }
    if cfg.outbox_file.exists() and cfg.agent_id:
        from .outbox import Outbox

        box = Outbox(cfg.outbox_file, cfg.agent_id, cfg.outbox_max)
        try:
            out["outbox"] = box.stats()
            from .takeover import takeover_state
            from .witness import read_status

            out["witness"] = read_status(box.db, cfg.data_dir)
            out["takeover"] = takeover_state(box)
            out["interval"] = cfg.interval_after_stored(box.get_meta("interval") or None)
        finally:
            box.close()
    else:
        out["outbox"] = {"backlog": 0, "unconfirmed": 0, "next_seq": 1, "sent": 0, "confirmed": 0, "dropped": 0,
                         "last_flush_at": None}
        out["interval"] = cfg.interval
    return out


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    check_local_files(cfg)
    st = collect_status(cfg)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True, default=str))
        return 0
    cert = st["certificate"]
    box = st["outbox"]
    print(f"agent id:     {st['agent_id'] or '(none: run `edge-agent keygen --id NAME`)'}")
    print(f"data dir:     {st['data_dir']}")
    print(f"broker:       {st['broker_url'] or '(not set)'}")
    if cert.get("enrolled"):
        print(f"certificate:  {cert['subject']} expires {cert['expires']} ({cert['days_left']} days left)")
    else:
        print("certificate:  (none: run `edge-agent enroll`)")
    crl = st["crl"]
    if not crl.get("installed"):
        print("crl:          (none installed: revocations are not checked until the coordinator pushes one)")
    else:
        print(f"crl:          {crl['state']}, next update {crl['next_update']}" + (f" ({crl['error']})" if crl.get("error") else ""))
    if st["revoked"]:
        from .revocation import FIX

        print(f"REVOKED:      {st['revoked'].get('detail') or st['revoked'].get('reason')} (since {_fmt_time(st['revoked'].get('at'))})")
        print(f"              `run` refuses to start: {FIX}")
    if st.get("takeover"):
        from .takeover import FIX as TAKEOVER_FIX
        from .takeover import cause

        t = st["takeover"]
        print(f"DUPLICATE ID: {cause(st['agent_id'])}: {t['count']} takeover(s), last {_fmt_time(t.get('last_at'))}")
        print(f"              fix: {TAKEOVER_FIX}")
    print(f"interval:     {st['interval']}s")
    print(f"outbox:       {box['backlog']} waiting, {box.get('unconfirmed', 0)} sent awaiting a receipt, {box['sent']} sent, "
          f"{box['dropped']} dropped, next seq {box['next_seq']}")
    print(f"last flush:   {_fmt_time(box['last_flush_at'])}")
    witness = st.get("witness")
    if witness:
        size = witness["accepted_size"]
        print(f"witness:      {'checkpoint of size ' + str(size) + ' accepted and cosigned' if size else 'no checkpoint accepted yet'}"
              f", {witness['alarms']} alarm(s)")
        if witness["last_alarm"]:
            from .witness import EVIDENCE_DIR, FIX

            alarm = witness["last_alarm"]
            print(f"WITNESS ALARM: {alarm['kind']} at {_fmt_time(alarm['at'])}: {alarm['detail']}")
            print(f"              {FIX.format(dir=cfg.data_dir / EVIDENCE_DIR)}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from security.doctor import report

    from .doctor import run_checks

    return report("edge-agent", run_checks(_config(args), warn_days=args.expiring, timeout=args.timeout), args.json)


def cmd_renew(args: argparse.Namespace) -> int:
    from .identity import renew_csr, renew_install

    cfg = _config(args)
    if args.csr == (args.cert is not None):
        raise AgentError("renew needs either --csr (write the request) or --cert FILE (install the new certificate)",
                         exit_codes.USAGE)
    if args.csr:
        path = renew_csr(cfg)
        print(f"csr: {path}\nnext: on the coordinator `edge-coordinator renew {cfg.agent_id} --csr agent.csr --out "
              f"{cfg.agent_id}.pem`, then here `edge-agent renew --cert {cfg.agent_id}.pem`")
        return 0
    cert = renew_install(cfg, args.cert)
    print(f"installed {cfg.cert_file} (serial {cert.serial_number:x}, valid until {cert.not_valid_after_utc:%Y-%m-%d})")
    print("a running agent keeps its current (still valid) certificate until told: "
          "`systemctl reload edge-agent` (SIGHUP) makes it sign and connect with the new one, no restart")
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edgeledger")
    except Exception:  # noqa: BLE001 - a frozen binary carries no package metadata
        return "unknown"


class _VersionAction(argparse.Action):
    """--version, looked up only when asked: the package-metadata scan behind it is not
    paid on every `run` (argparse's own version action needs the string up front)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"{parser.prog} {_version()}")
        parser.exit()


def _data_dir(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """--data-dir, accepted before and after the subcommand (the later one wins)."""
    parser.add_argument("--data-dir", type=Path, default=default,
                        help="state directory (key, certificates, agent.toml, outbox); "
                             "default $EDGE_AGENT_DATA_DIR or /var/lib/edge-agent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Edge device agent: samples sensors and sends signed Celery tasks over MQTT (mutual TLS).",
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    _data_dir(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("keygen", help="make this device's EC P-256 key and a CSR",
                       description="Create the private key (0600) and a certificate signing request.")
    p.add_argument("--id", help="agent id (certificate CN): letters, digits, - _ .")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    _data_dir(p)
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("enroll", help="install the certificate the coordinator signed",
                       description="Install the signed certificate, the fleet CA (and CRL) into the data dir.")
    p.add_argument("--cert", type=Path, help="this agent's certificate (PEM)")
    p.add_argument("--ca", type=Path, help="the fleet CA certificate (PEM)")
    p.add_argument("--crl", type=Path, help="the fleet CRL (PEM), optional")
    p.add_argument("--bundle", type=Path, help="directory with ca.pem, <id>.pem, optional crl.pem and agent.toml")
    p.add_argument("--broker-url", help="mqtts://host:port to store in agent.toml")
    _data_dir(p)
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("run", help="run the agent (Celery worker on agent.<id>, sampler, outbox)",
                       description="Run the agent in the foreground until SIGTERM/SIGINT. Exits 78 when this "
                                   "device is revoked (broker refused its certificate or the fleet CRL lists it); "
                                   "it then refuses to start until re-enrolled (unsent readings are kept).")
    p.add_argument("--broker-url", help="override broker_url (mqtts://host:port)")
    p.add_argument("--interval", type=float, help="override the sampling interval (seconds)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default), ERROR")
    _data_dir(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("doctor", help="preflight: key, certificate, CRL, broker over TLS, outbox, disk",
                       description="Check everything `run` needs, one line each with OK/WARN/FAIL and the fix; "
                                   "connects to the broker once with this device's certificate. "
                                   "Exit 0 when nothing FAILs, 6 otherwise.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--expiring", type=int, default=14, metavar="DAYS",
                   help="warn when the certificate expires within DAYS (default 14)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for the broker probe (default 5)")
    _data_dir(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("renew", help="rotate this device's certificate: write a CSR, then install the new certificate",
                       description="Step 1: `renew --csr` writes a CSR with this device's key for "
                                   "`edge-coordinator renew ID --csr FILE`. Step 2: `renew --cert FILE` checks and "
                                   "installs the new certificate atomically. A running agent takes it up on SIGHUP "
                                   "(`systemctl reload edge-agent`) without a restart, or at its next start.")
    p.add_argument("--csr", action="store_true", help="write the CSR (agent.csr) for the coordinator")
    p.add_argument("--cert", type=Path, help="the renewed certificate to install (PEM)")
    _data_dir(p)
    p.set_defaults(func=cmd_renew)

    p = sub.add_parser("status", help="show local state (id, certificate, outbox) without the broker",
                       description="Print the agent's local state from its files; needs no broker.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _data_dir(p)
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AgentError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED
    except BrokenPipeError:
        return exit_codes.silence_stdout()


if __name__ == "__main__":
    raise SystemExit(main())
