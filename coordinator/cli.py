"""The `edge-coordinator` command: init, run, enroll, renew, revoke, agents, send, result, doctor, demo.

Why: one entry point for the fleet operator. Every failure the operator can fix is a
`CoordinatorError` printed as one line, with the exit code of its kind
(security.exit_codes; usage errors exit 2 like argparse's).
Heavy imports (Celery, web3) happen inside the commands that need them so `--help`
and `init` stay fast.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path

from security import exit_codes

from .broker_acl import agent_enrolled, agent_revoked
from .config import CoordinatorConfig, load_config, save_config
from .errors import CoordinatorError

PROG = "edge-coordinator"

SEND_EXAMPLES = """examples (agent pi-01):
  edge-coordinator send pi-01 status
  edge-coordinator send pi-01 set_interval 30
  edge-coordinator send pi-01 set_interval -k seconds=2.5 --json
  edge-coordinator send pi-01 sample_now --kwargs '{"sensor": "simulated"}'
  edge-coordinator send pi-01 set_interval 10 --countdown 5 --expires 600 --timeout 60
  ID=$(edge-coordinator send pi-01 status --no-wait) && edge-coordinator result "$ID" --timeout 60

sample_now's sensor is a driver name from the agent's `sensors` setting (e.g. simulated),
not the `sensor` field of its readings (sim_temp). A command that gets no result in time
stays queued for the agent: `edge-coordinator result ID` shows its result later.
exit codes: 0 success, 2 usage, 3 the command failed on the agent, 4 no result in time,
5 not delivered (broker down, agent not enrolled, not connected or revoked); see docs/OPERATIONS.md."""


def _common(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """--data-dir/--config, accepted before and after the subcommand (a later one wins)."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--data-dir", type=Path, default=default,
                        help="data directory (default var/coordinator or $EDGE_COORDINATOR_DATA_DIR)")
    parser.add_argument("--config", type=Path, default=default,
                        help="config file (default <data-dir>/coordinator.toml or $EDGE_COORDINATOR_CONFIG)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fleet coordinator: ingests signed tasks from edge agents over MQTT/TLS and records every execution on an Ethereum ledger.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("init", help="create the data dir, fleet CA, coordinator and broker certificates, coordinator.toml")
    _common(p)
    p.add_argument("--broker-port", type=int, help="TLS port of the managed Mosquitto (default 8883)")
    p.add_argument("--chain-port", type=int, help="port of the managed anvil (default 8545)")
    p.add_argument("--http-port", type=int, help="port of /metrics and /healthz on 127.0.0.1 (default 9464)")
    p.add_argument("--broker-url", help="use this external broker instead of running Mosquitto")
    p.add_argument("--chain-url", help="use this external JSON-RPC endpoint instead of running anvil")
    p.add_argument("--acl-mode", choices=("dynsec", "file"),
                   help="broker ACLs: dynsec (default: subscriptions checked, revoke cuts live connections) or "
                        "file (UNSAFE: SUBSCRIBE unchecked, any agent can drop others' readings; revoked agents stay connected)")
    p.add_argument("--repair", action="store_true",
                   help="on an existing data dir: re-issue a missing coordinator or broker certificate/key (and CRL) "
                        "from its fleet CA; nothing else changes")

    p = sub.add_parser("run", help="run the daemon: broker, chain, ingest worker, chain writer, metrics",
                       description="Run the daemon: managed Mosquitto (broker.acl_mode dynsec by default; 'file' is "
                                   "UNSAFE and logged as such), anvil, ingest worker, chain writer, metrics; re-issues "
                                   "the CRL every pki.crl_refresh seconds and pushes it to the agents.")
    _common(p)

    p = sub.add_parser("enroll", help="sign an agent CSR (or make a demo bundle with --bundle NAME)")
    _common(p)
    p.add_argument("csr", nargs="?", type=Path, help="PEM certificate signing request from `edge-agent keygen`")
    p.add_argument("--bundle", metavar="NAME", help="demo convenience: generate key, CSR and certificate for agent NAME in a bundle dir")
    p.add_argument("--out", type=Path, help="certificate file (CSR mode, default stdout) or bundle dir (default <data-dir>/bundles/NAME)")
    p.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365)")
    p.add_argument("--force", action="store_true",
                   help="issue although the id is revoked (re-enrolment) or still has a valid certificate")

    p = sub.add_parser("revoke", help="revoke an agent: new CRL, broker reload, its broker rights and live connection cut, CRL pushed to agents")
    _common(p)
    p.add_argument("agent", help="agent id (certificate CN)")

    p = sub.add_parser("agents", help="list enrolled agents: status, last seen, certificate expiry, outbox backlog")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--expiring", type=int, default=14, metavar="DAYS",
                   help="warn about certificates that expire within DAYS (default 14)")

    p = sub.add_parser("send", help="send a command to an agent and wait for its signed result",
                       description="Send one signed command to one agent (like `celery call`) and wait for its "
                                   "signed result. Arguments are checked against the command's signature first.",
                       epilog=SEND_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("agent", help="agent id")
    p.add_argument("task", help="command: sample_now, set_interval, status (or the full name edge.agent.<command>)")
    p.add_argument("args", nargs="*", help="positional arguments (JSON values, e.g. 5 or '\"temp\"')")
    p.add_argument("--kwargs", metavar="JSON", help="keyword arguments as a JSON object")
    p.add_argument("-k", dest="kw", action="append", default=[], metavar="NAME=VALUE",
                   help="one keyword argument (VALUE as JSON when it parses); repeatable")
    p.add_argument("--countdown", type=float, metavar="SECONDS", help="run it SECONDS from now (at most signing's max_delay_seconds)")
    p.add_argument("--expires", type=float, metavar="SECONDS", help="drop it unless it starts within SECONDS")
    p.add_argument("--timeout", type=float, help="seconds to wait for the result (default worker.send_timeout)")
    p.add_argument("--no-wait", action="store_true", help="print the task id and return at once (`result ID` later)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("result", help="show (or wait for) the result of a command sent earlier",
                       description="Show the result an agent reported for a command sent earlier (journaled by the "
                                   "running daemon); only the commanded agent's report counts.")
    _common(p)
    p.add_argument("task_id", metavar="ID", help="task id printed by `send` (or a unique prefix of it)")
    p.add_argument("--timeout", type=float, default=0.0, help="seconds to wait for it (default 0: show what is there)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("demo", help="bring everything up on loopback with simulated agents and audit the result")
    _common(p)
    p.add_argument("--agents", type=int, default=3, help="number of simulated agents (default 3)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds the agents run (default 20)")
    p.add_argument("--interval", type=float, default=0.5, help="agents' sampling interval in seconds (default 0.5)")
    p.add_argument("--keep", action="store_true", help="keep the demo data dir (printed at the end)")

    p = sub.add_parser("doctor", help="preflight: PKI files and permissions, certificates, CRL, broker, chain, journal, disk",
                       description="Check everything `run` needs, one line each with OK/WARN/FAIL and the fix. "
                                   "Exit 0 when nothing FAILs, 6 otherwise.")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--expiring", type=int, default=14, metavar="DAYS",
                   help="warn about certificates that expire within DAYS (default 14)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for each network probe (default 5)")

    p = sub.add_parser("renew", help="issue a new certificate for an agent (from its CSR), the coordinator or the broker",
                       description="Rotate a certificate without downtime: the old one is not revoked and stays "
                                   "valid until it expires. NAME is an agent id (needs --csr), the coordinator's "
                                   "identity, or `broker`; --self renews the coordinator's and the broker's.")
    _common(p)
    p.add_argument("name", nargs="?", metavar="NAME", help="agent id, the coordinator identity, or broker")
    p.add_argument("--self", dest="self_", action="store_true", help="the coordinator's and the broker's certificates")
    p.add_argument("--csr", type=Path, help="the agent's CSR (`edge-agent renew --csr` writes it)")
    p.add_argument("--out", type=Path, help="agent certificate file (default stdout)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="broker only: a host name or address devices connect to (repeatable; kept on later renewals)")

    p = sub.add_parser("peer", help="make the data dir of another ingest coordinator (same fleet CA, broker and chain)",
                       description="On the first coordinator (it holds the fleet CA): issue a certificate for peer "
                                   "coordinator NAME into a new data dir, with its own log key and recorder account, "
                                   "pointing at this coordinator's broker and chain; give NAME the coordinator's broker "
                                   "rights and list it under `peers`. Copy the dir to the peer's host and run "
                                   "`edge-coordinator run --data-dir DIR` there (docs/OPERATIONS.md).")
    _common(p)
    p.add_argument("name", metavar="NAME", help="the peer's identity (certificate CN), e.g. coordinator-b")
    p.add_argument("--out", type=Path, required=True, help="the peer's new data dir")
    p.add_argument("--chain-key", required=True, help="the peer's own funded recorder account key (0x hex)")
    p.add_argument("--http-port", type=int, default=9464, help="the peer's /metrics and /healthz port (default 9464)")
    p.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365)")

    from .erase import add_parser as add_erase_parser

    add_erase_parser(sub, _common)
    return parser


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("edgeledger")
    except Exception:  # noqa: BLE001 - a frozen binary carries no package metadata
        return "unknown"


def emit_json(value: object) -> None:
    """The one JSON style of every edge-* tool: one document on stdout."""
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _config(args: argparse.Namespace, require_file: bool = True) -> CoordinatorConfig:
    return load_config(args.config, data_dir=args.data_dir, require_file=require_file)


def cmd_init(args: argparse.Namespace) -> int:
    from .fleet_pki import FleetStore

    if args.repair:
        cfg = _config(args)
        made = FleetStore(cfg).repair()
        print("\n".join(f"re-issued {p}" for p in made) if made else f"nothing to repair in {cfg.pki_dir}")
        return 0
    # init's flags go through the same loader (range checks, precedence) and into the file
    flags = {"broker.port": args.broker_port, "chain.port": args.chain_port, "http.port": args.http_port,
             "broker.url": args.broker_url or None, "chain.url": args.chain_url or None, "broker.acl_mode": args.acl_mode}
    cfg = load_config(args.config, data_dir=args.data_dir, require_file=False, flags=flags)
    cfg.data_dir = cfg.data_dir.resolve()
    store = FleetStore(cfg)
    store.init()
    from .tlog_setup import coordinator_log_key

    coordinator_log_key(cfg)  # pki/log.key (0600) + pki/log.pub: the transparency log's key
    path = save_config(cfg)
    print(f"initialised {cfg.data_dir}")
    print(f"  config       {path}")
    print(f"  fleet CA     {cfg.ca_path}")
    print(f"  coordinator  {cfg.cert_path}")
    print(f"  broker cert  {store.broker_cert}")
    print(f"  log key      {cfg.pki_dir / 'log.pub'}")
    print(f"next: edge-coordinator run --data-dir {cfg.data_dir}")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from .fleet_pki import FleetStore

    cfg = _config(args)
    store = FleetStore(cfg)
    if args.bundle and args.csr:
        raise CoordinatorError("give either a CSR file or --bundle NAME, not both")
    if args.bundle:
        out = store.make_bundle(args.bundle, args.out, cfg.broker_url, days=args.days, force=args.force)
        print(f"bundle for {args.bundle} written to {out}")
        _note(agent_enrolled(cfg, args.bundle))
        print(f"next: edge-agent enroll --bundle {out}")
        return 0
    if not args.csr:
        raise CoordinatorError("nothing to enroll: give a CSR file (from `edge-agent keygen`) or --bundle NAME")
    try:
        csr = args.csr.read_bytes()
    except OSError as exc:
        raise CoordinatorError(f"cannot read CSR {args.csr}: {exc.strerror}") from None
    cert = store.sign_csr(csr, days=args.days, force=args.force)
    from cryptography import x509

    from security.pki import common_name

    _note(agent_enrolled(cfg, common_name(x509.load_pem_x509_certificate(cert))), err=True)
    _write_certificate(cert, args.out)
    return 0


def _write_certificate(cert: bytes, out: Path | None, next_step: str = "") -> None:
    """To `--out` (saying so, and what comes next) or to stdout."""
    if out:
        out.write_bytes(cert)
        print(f"certificate written to {out}{next_step}", file=sys.stderr)
    else:
        sys.stdout.write(cert.decode())


def cmd_peer(args: argparse.Namespace) -> int:
    from .broker_acl import peer_added
    from .peers import make_peer

    cfg = _config(args)
    peer = make_peer(cfg, args.name, args.out, chain_key=args.chain_key, http_port=args.http_port, days=args.days)
    _note(peer_added(cfg, args.name))
    print(f"peer {args.name} written to {peer.data_dir} (broker {peer.broker_url}, chain {peer.chain_url})")
    print(f"  agents: add {args.name!r} to command_signers in agent.toml (and witness = false)")
    print(f"next: copy {peer.data_dir} to the peer's host privately, then edge-coordinator run --data-dir DIR")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """In this order: CRL, broker reload (new handshakes), dynsec removal (cuts the live
    connection; a reconnect then meets the reloaded CRL), CRL push to the other agents."""
    from .broker import running_broker_pid
    from .fleet_pki import FleetStore

    cfg = _config(args)
    store = FleetStore(cfg)
    serials = store.revoke(args.agent)
    print(f"revoked {args.agent}: {len(serials)} certificate(s); CRL {cfg.crl_path} updated")
    broker_pid = running_broker_pid(cfg) if cfg.managed_broker else None
    if broker_pid:
        os.kill(broker_pid, signal.SIGHUP)  # directly: it must re-read the CRL before the dynsec cut below
        print(f"told the broker (pid {broker_pid}) to reload the CRL")
    pid = daemon_pid(cfg)
    if pid:
        os.kill(pid, signal.SIGHUP)
        print(f"told the running coordinator (pid {pid}) to reload the CRL")
    else:
        print("no coordinator running: the CRL takes effect at the next `run`")
    _note(agent_revoked(cfg, args.agent))
    if cfg.broker.acl_mode == "file":
        print(f"warning: broker.acl_mode is \"file\": {args.agent}'s live connection stays up until it reconnects "
              "(its tasks are refused by the signature checks); use dynsec to cut it at once", file=sys.stderr)
    # the revoked agent too: in file mode its live connection still reads its queue, so an
    # honest agent learns it is revoked and stops (under dynsec the copy is never delivered)
    _push_crl(cfg, [*store.active_agents(), args.agent])
    return 0


def _push_crl(cfg: CoordinatorConfig, agents: list[str]) -> None:
    from .crl_push import push_crl
    from .supervisor import port_open

    if cfg.managed_broker and not port_open(cfg.broker.port, cfg.broker.host):
        print("broker not running: agents get the new CRL when `edge-coordinator run` starts")
        return
    print(push_crl(cfg, agents).summary())


def _note(message: str | None, err: bool = False) -> None:
    if message:
        print(message, file=sys.stderr if err else sys.stdout)


def daemon_pid(cfg: CoordinatorConfig) -> int | None:
    """Pid of a live `run` on this data dir, from its pid file."""
    path = cfg.run_dir / "coordinator.pid"
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_agents(args: argparse.Namespace) -> int:
    from .fleet_pki import FleetStore
    from .registry import list_agents

    cfg = _config(args)
    from .preflight import check_database

    check_database(cfg.journal_path)  # a damaged journal: one line, not a traceback from the registry read
    views = list_agents(FleetStore(cfg), cfg.journal_path)
    _warn_expiring(views, args.expiring)
    _warn_takeovers(views, cfg.stale_after)
    if args.json:
        emit_json([v.__dict__ for v in views])
        return 0
    if not views:
        print("no agents enrolled: edge-coordinator enroll CSR (or --bundle NAME)")
        return 0
    print(f"{'AGENT':<20} {'STATUS':<10} {'LAST SEEN (UTC)':<20} {'CERT EXPIRES':<20} {'BACKLOG':>7} {'READINGS':>8}"
          f" {'GAPS':>6} {'DROPPED':>7} {'UNCONFIRMED':>11}")
    for v in views:
        backlog = "-" if v.outbox_backlog is None else str(v.outbox_backlog)
        gaps, dropped, unconfirmed = ("-" if n is None else str(n) for n in (v.gaps, v.dropped, v.unconfirmed))
        print(f"{v.agent_id:<20} {v.status:<10} {_when(v.last_seen):<20} {_when(v.cert_not_after):<20} {backlog:>7} {v.readings:>8}"
              f" {gaps:>6} {dropped:>7} {unconfirmed:>11}")
    return 0


def _warn_expiring(views: list, days: int, now: float | None = None) -> None:
    """One stderr line per unrevoked agent whose certificate expires within `days` (stdout stays parseable)."""
    import time

    now = time.time() if now is None else now
    for v in views:
        if v.status in ("revoked", "expired") or v.cert_not_after is None:
            continue
        left = v.cert_not_after - now
        if left <= days * 86400:
            print(f"warning: {v.agent_id}'s certificate expires in {left / 86400:.1f} day(s) ({_when(v.cert_not_after)} UTC): "
                  f"renew it (`edge-coordinator renew AGENT --csr FILE`, then `edge-agent renew --cert FILE` on the device)",
                  file=sys.stderr)


def _warn_takeovers(views: list, recent: float, now: float | None = None) -> None:
    """One stderr line per agent whose heartbeat reported losing its connection to another device with its id."""
    import time

    now = time.time() if now is None else now
    for v in views:
        last = getattr(v, "takeover_last_at", None)
        if v.takeovers and last and now - last <= recent:
            print(f"warning: {v.agent_id}: another device is connected with agent id {v.agent_id!r} ({v.takeovers} "
                  f"takeover(s), last {_when(last)} UTC): find the second device, stop it or give it its own identity; "
                  f"if the key was copied, `edge-coordinator revoke {v.agent_id}` and re-enroll", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from .preflight import check_run, corrupt_database

    cfg = _config(args)
    check_run(cfg)  # before the broker and the chain start
    from .daemon import run_daemon

    try:
        code = run_daemon(cfg)
    except sqlite3.DatabaseError as exc:
        raise corrupt_database(cfg.journal_path, exc) from None
    if code == 0:  # stopped in order: the next `run` may skip the journal's full scan
        from ledger.sqlite_files import mark_clean_stop

        mark_clean_stop(cfg.journal_path)
    return code


def cmd_send(args: argparse.Namespace) -> int:
    from .dispatch import check_call, parse_kwargs, send_command

    kwargs = parse_kwargs(args.kwargs, args.kw)
    check_call(args.task, args.args, kwargs)  # usage errors before the config is even read
    cfg = _config(args)
    reply = send_command(cfg, args.agent, args.task, args.args, timeout=args.timeout, kwargs=kwargs,
                         countdown=args.countdown, expires=args.expires, wait=not args.no_wait)
    return _report(reply, args.json)


def cmd_result(args: argparse.Namespace) -> int:
    from .dispatch import fetch_result

    return _report(fetch_result(_config(args), args.task_id, timeout=args.timeout), args.json)


def _report(reply: dict, as_json: bool) -> int:
    """Print a send/result reply; the exit code says SUCCESS (0) or FAILURE (3)."""
    status = reply.get("status")
    code = exit_codes.OK if status in ("SUCCESS", "SENT") else exit_codes.TASK_FAILED
    if as_json:
        emit_json(reply)
        return code
    if status == "SENT":
        print(reply["task_id"])  # bare, for ID=$(edge-coordinator send ... --no-wait)
        return code
    took = f", {reply['seconds']:g}s" if "seconds" in reply else ""
    print(f"{status}  {reply['command']} on {reply['agent']} (task {reply['task_id']}{took})")
    result = reply.get("result")
    print(result if isinstance(result, str) else json.dumps(result, indent=2, sort_keys=True, default=str))
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(agents=args.agents, duration=args.duration, interval=args.interval, data_dir=args.data_dir, keep=args.keep)


def cmd_erase(args: argparse.Namespace) -> int:
    from .erase import cmd_erase as erase

    return erase(args, _config(args))


def cmd_doctor(args: argparse.Namespace) -> int:
    from security.doctor import report

    from .doctor import run_checks

    cfg = _config(args)
    findings = run_checks(cfg, daemon_running=daemon_pid(cfg) is not None, warn_days=args.expiring,
                          timeout=args.timeout)
    return report(PROG, findings, args.json)


def cmd_renew(args: argparse.Namespace) -> int:
    from .fleet_pki import BROKER_IDENTITY, FleetStore

    cfg = _config(args)
    store = FleetStore(cfg)
    own = [cfg.identity, BROKER_IDENTITY] if args.self_ else [args.name] if args.name in (cfg.identity, BROKER_IDENTITY) else []
    if args.self_ and args.name:
        raise CoordinatorError("give NAME or --self, not both", exit_codes.USAGE)
    if own:
        for name in own:
            path = store.renew_own(name, hosts=tuple(args.host) if name == BROKER_IDENTITY else (), days=args.days)
            print(f"renewed {name}: {path} (same key; the old certificate stays valid until it expires)")
        _apply_own_renewal(cfg, own)
        return 0
    if not args.name:
        raise CoordinatorError("renew what? give an agent id with --csr FILE, `coordinator`, `broker` or --self",
                               exit_codes.USAGE)
    if args.csr is None:
        raise CoordinatorError(f"renewing agent {args.name!r} needs its CSR: `edge-agent renew --csr` on the device "
                               f"writes one, then `edge-coordinator renew {args.name} --csr FILE`", exit_codes.USAGE)
    try:
        csr = args.csr.read_bytes()
    except OSError as exc:
        raise CoordinatorError(f"cannot read CSR {args.csr}: {exc.strerror}") from None
    cert = store.renew_agent(args.name, csr, days=args.days)
    _write_certificate(cert, args.out, "; next, on the device: edge-agent renew --cert FILE")
    return 0


def _apply_own_renewal(cfg: CoordinatorConfig, names: list[str]) -> None:
    """The broker re-reads its certificate on SIGHUP; the daemon uses its new one from its next start."""
    from .broker import running_broker_pid
    from .fleet_pki import BROKER_IDENTITY

    if BROKER_IDENTITY in names and cfg.managed_broker:
        pid = running_broker_pid(cfg)
        if pid:
            os.kill(pid, signal.SIGHUP)
            print(f"told the broker (pid {pid}) to reload its certificate (new TLS connections use it)")
    if cfg.identity in names and daemon_pid(cfg):
        print("the running coordinator keeps its current (still valid) certificate until its next restart")


COMMANDS = {
    "doctor": cmd_doctor,
    "renew": cmd_renew,
    "erase": cmd_erase,
    "init": cmd_init,
    "run": cmd_run,
    "enroll": cmd_enroll,
    "revoke": cmd_revoke,
    "peer": cmd_peer,
    "agents": cmd_agents,
    "send": cmd_send,
    "result": cmd_result,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except CoordinatorError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED
    except BrokenPipeError:
        return exit_codes.silence_stdout()


if __name__ == "__main__":
    raise SystemExit(main())
