"""`edge-audit`: list, show, verify, reconcile and export the execution ledger.

Exit codes (security.exit_codes): 0 OK, 1 verification/reconciliation found problems,
2 usage or config error, 65 the journal is corrupt, 141 stdout closed early.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ledger import audit, bundle, completeness
from ledger.audit_config import ENV, AuditConfig, ConfigError
from ledger.audit_guard import data_dir_journal, guarded, open_journal, resolve_task_id
from ledger.journal import Journal
from ledger.logkey import LogKeyError, load_verifier
from ledger.pins import PinError, PinStore, default_pins_path
from ledger.tlog.cosignature import CosignatureV1Verifier

EPILOG = (f"Settings: flags > env ({ENV['journal']}, {ENV['rpc_url']}, {ENV['contract']}) > TOML file "
          f"(--config or {ENV['config']}) > the journal's own ledger config.")


def _timestamp(text: str) -> float:
    """Unix seconds or ISO 8601 (naive = UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither unix seconds nor ISO 8601 (2026-11-26T10:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _common(sub: bool) -> argparse.ArgumentParser:
    """Connection options, accepted before or after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    d = argparse.SUPPRESS if sub else None
    g = p.add_argument_group("where the ledger is")
    g.add_argument("--config", metavar="FILE", default=d, help=f"TOML settings file (env {ENV['config']})")
    g.add_argument("--journal", metavar="PATH", default=d, help=f"journal SQLite file (env {ENV['journal']})")
    g.add_argument("--data-dir", dest="data_dir", metavar="DIR", default=d,
                   help="the coordinator's data dir: its journal.db (same as --journal DIR/journal.db)")
    g.add_argument("--rpc-url", dest="rpc_url", metavar="URL", default=d,
                   help=f"Ethereum JSON-RPC URL (env {ENV['rpc_url']})")
    g.add_argument("--contract", metavar="ADDR", default=d, help=f"ExecutionLedger address (env {ENV['contract']})")
    g.add_argument("--recorder", dest="recorders", metavar="ADDR", action="append", default=d,
                   help="trust events from this sender too (repeatable); the journal's recorders are always trusted")
    g.add_argument("--log-key", dest="log_key", metavar="VKEY", default=d,
                   help=f"the log's verifier key: a vkey file (the coordinator's pki/log.pub) or string (env "
                        f"{ENV['log_key']}; default: the journal's, or pki/log.pub next to it)")
    g.add_argument("--json", action="store_true", default=d, help="machine-readable output")
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edgeledger")
    except Exception:  # noqa: BLE001 - a frozen binary carries no package metadata
        return "unknown"


def _log_policy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pins", metavar="FILE", type=Path, help=f"checkpoint pin file (default {default_pins_path()}); "
                   "first use pins the log, later use must be consistent with it")
    p.add_argument("--no-pins", action="store_true", help="neither check nor update a pin file")
    p.add_argument("--witnesses", type=int, default=0, metavar="K",
                   help="require K witnesses to have cosigned the log (default 0); without --witness-key the "
                        "agents' own witness keys count, bound to them by their signed edge.witness.cosign tasks")
    p.add_argument("--witness-key", dest="witness_keys", action="append", default=[], metavar="VKEY",
                   help="a witness's cosignature/v1 verifier key (string or file; repeatable)")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", help="only this agent id")
    p.add_argument("--task-name", help="only this task name (e.g. edge.ingest)")
    p.add_argument("--status", help="only this status (SUCCESS, FAILURE, REJECTED, ...)")
    p.add_argument("--state", choices=["pending", "sent", "confirmed", "conflict"], help="only this anchoring state")
    p.add_argument("--since", type=_timestamp, help="received at or after (unix seconds or ISO 8601, UTC)")
    p.add_argument("--until", type=_timestamp, help="received before (unix seconds or ISO 8601, UTC)")
    p.add_argument("--limit", type=int, help="at most N rows")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-audit", parents=[_common(False)], epilog=EPILOG,
                                     description="Audit the edgeledger execution journal against the chain.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common(True)
    p = subs.add_parser("list", parents=[common], help="list journal records", epilog=EPILOG,
                        description="List journal records, oldest first.")
    _filters(p)
    p = subs.add_parser("show", parents=[common], help="show one record in full", epilog=EPILOG,
                        description="Show one record: fields, canonical JSON, digests, anchoring.")
    p.add_argument("task_id", metavar="TASK_ID")
    p = subs.add_parser("verify", parents=[common], help="verify every record against the signed, anchored log",
                        epilog=EPILOG, description="Recompute each record's log leaf and check it is in the "
                        "checkpoints the log key signed and the chain anchored; check checkpoints extend each other "
                        "and the pinned one; re-verify the signed envelopes. With --bundle: offline, from an "
                        "exported bundle (no journal, no chain). Exit 1 on any problem.")
    p.add_argument("--bundle", metavar="FILE", type=Path, help="verify this exported bundle offline instead")
    p.add_argument("--no-signatures", action="store_true", help="skip envelope signature checks")
    _log_policy(p)
    p.add_argument("--require-anchored", action="store_true", help="fail on rows not yet on chain")
    p.add_argument("--from-block", type=int, help="first block to scan (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p = subs.add_parser("fleet", parents=[common], help="verify several coordinators' journals as one fleet",
                        epilog=EPILOG, description="Several coordinators share the ingest queue, each with its own "
                        "journal, log key and chain account. Verify each DATA_DIR's journal on its own (as `verify`: "
                        "log, chain, signatures; its own chain settings and log key), then merge completeness across "
                        "all: every (agent, seq) stored exactly once. A seq missing from every journal (gap) or stored "
                        "in two (duplicate) fails. Exit 1 on any problem.")
    p.add_argument("data_dirs", nargs="+", metavar="DATA_DIR", type=Path,
                   help="a coordinator's data dir (its journal.db, pki/log.pub); give every coordinator's")
    p.add_argument("--no-signatures", action="store_true", help="skip envelope signature checks")
    _log_policy(p)
    p.add_argument("--require-anchored", action="store_true", help="fail on rows not yet on chain")
    p.add_argument("--from-block", type=int, help="first block to scan (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p = subs.add_parser("reconcile", parents=[common], help="journal vs chain: missing, mismatched, unanchored",
                        epilog=EPILOG, description="Report rows missing on chain, mismatched digests, rows not "
                        "anchored yet and chain events with no journal row. Exit 1 on missing/mismatched.")
    p.add_argument("--from-block", type=int, help="first block to scan (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(no_pins=True, witnesses=0, witness_keys=[], pins=None)
    p = subs.add_parser("export", parents=[common], help="export records as JSONL, CSV or a verifiable bundle",
                        epilog=EPILOG, description="Export records (without envelope bytes) as JSONL or CSV, or "
                        "with --bundle a self-contained bundle (records, inclusion proofs, checkpoints, "
                        "cosignatures, envelopes, certificates) that `edge-audit verify --bundle` checks offline.")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--bundle", action="store_true", help="write a verifiable audit bundle (JSON)")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    _filters(p)
    return parser


def _filters_of(args: argparse.Namespace) -> audit.Filters:
    return audit.Filters(agent=args.agent, task_name=args.task_name, status=args.status, anchor_state=args.state,
                         since=args.since, until=args.until, limit=args.limit)


def _events(config: AuditConfig, journal: Journal, args: argparse.Namespace, origin: str):
    from ledger.deploy import connect

    saved = journal.get_config()
    rpc_url = config.rpc_url or saved.get("rpc_url")
    address = config.contract or saved.get("contract_address")
    if not rpc_url or not address:
        raise ConfigError(f"no chain configured: pass --rpc-url and --contract (or {ENV['rpc_url']} / "
                          f"{ENV['contract']}); the journal names none")
    w3 = connect(rpc_url)
    if not w3.is_connected():
        raise audit.AuditError(f"cannot reach {rpc_url}: is the chain running?")
    progress = None
    if not args.quiet and not args.json:
        def progress(done: int, last: int) -> None:
            if last >= config.log_chunk:
                print(f"\rscanning blocks: {done}/{last}", end="" if done < last else "\n", file=sys.stderr)
    from_block = args.from_block if args.from_block is not None else config.from_block
    return audit.fetch_events(w3, address, origin, from_block=from_block, chunk=config.log_chunk, progress=progress)


def _log_verifier(config: AuditConfig, journal: Journal | None):
    """--log-key > env/TOML > the journal's own record of its key > pki/log.pub next to the journal."""
    if config.log_key:
        return load_verifier(config.log_key)
    if journal is not None:
        saved = journal.get_config().get("log_vkey")
        if saved:
            return load_verifier(saved)
        beside = journal.path.parent / "pki" / "log.pub"
        if beside.exists():
            return load_verifier(beside)
    raise ConfigError(f"no log key: pass --log-key FILE (the coordinator's pki/log.pub) or set {ENV['log_key']}")


def _policy(args: argparse.Namespace, log_verifier: Any) -> audit.LogPolicy:
    pins = None if args.no_pins else PinStore(args.pins or default_pins_path())
    witnesses = []
    for text in args.witness_keys:
        vkey = Path(text).read_text().strip() if Path(text).exists() else text
        try:
            witnesses.append(CosignatureV1Verifier.from_vkey(vkey))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a usage error
            raise ConfigError(f"--witness-key {text[:40]!r} is not a cosignature/v1 verifier key: {exc}") from None
    if args.witnesses < 0 or (witnesses and args.witnesses > len(witnesses)):
        raise ConfigError(f"--witnesses {args.witnesses} needs at least that many --witness-key (got {len(witnesses)})")
    return audit.LogPolicy(log_verifier, pins, witnesses, args.witnesses)


def _report(report: audit.AuditReport, as_json: bool, extra: dict[str, Any] | None = None) -> int:
    if as_json:
        print(json.dumps({**report.as_dict(), **(extra or {})}, indent=2))
    else:
        for line in audit.summarize(report):
            print(line)
    return 0 if report.ok else 1


def _verify_bundle(args: argparse.Namespace, config: AuditConfig) -> int:
    try:
        data = bundle.load_bundle(args.bundle.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read bundle {args.bundle}: {exc.strerror}") from None
    log_verifier = load_verifier(config.log_key) if config.log_key else None
    policy = _policy(args, log_verifier)
    if log_verifier is None:
        pin = policy.pins.get(data.get("origin", "")) if policy.pins else None
        from ledger.tlog.note import Ed25519Verifier

        policy.log_verifier = Ed25519Verifier.from_vkey(pin.vkey) if pin else bundle.bundle_verifier(data)
    report = bundle.verify_bundle(data, policy, check_signatures=not args.no_signatures,
                                  verifier=audit.default_verifier())
    if policy.pins is not None and bundle.pin_after(report) and report.tree_size:
        from ledger.tlog.checkpoint import open_checkpoint

        cp, _ = open_checkpoint(data["checkpoint"], policy.log_verifier)
        policy.pins.update(cp.origin, policy.log_verifier.vkey, cp.size, cp.root_hash)
    return _report(report, args.json)


def _command(row: dict[str, Any]) -> str:
    """`set_interval args 1a2b..` for a command result (which command it answered), else ''."""
    if "command" not in row:
        return ""
    if row["command"] is None:
        return "(command not recorded or erased)"
    digest = row["command_args_digest"] or "-"
    return f"{str(row['command']).removeprefix('edge.agent.')} args {digest[:16]}"


def _print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'TASK ID':38} {'TASK':22} {'AGENT':16} {'STATUS':9} {'RECEIVED (UTC)':24} {'ANCHOR':10} {'BLOCK':8} COMMAND")
    for r in rows:
        block = r["block_number"] if r["block_number"] is not None else "-"
        print(f"{r['task_id']:38} {r['task_name'][:22]:22} {r['agent_id'][:16]:16} {r['status'][:9]:9} "
              f"{_iso(r['received_at']):24} {r['anchor_state']:10} {block!s:8} {_command(r)}".rstrip())
    print(f"{len(rows)} records")


def _check_journal(config: AuditConfig, journal: Journal,
                   args: argparse.Namespace) -> tuple[audit.AuditReport, audit.LogPolicy]:
    """`verify` / `reconcile` of one journal against its log and chain (no completeness)."""
    policy = _policy(args, _log_verifier(config, journal))
    events = _events(config, journal, args, policy.log_verifier.name)
    recorders = audit.known_recorders(journal, config.recorders)
    if args.command == "reconcile":
        report = audit.reconcile(journal, events, recorders, policy)
    else:
        report = audit.audit(journal, events, recorders, policy, check_signatures=not args.no_signatures,
                             verifier=audit.default_verifier(), require_anchored=args.require_anchored)
    return report, policy


def _pin_after(report: audit.AuditReport, policy: audit.LogPolicy, journal: Journal) -> None:
    """Move the pin to the newest checkpoint unless the history itself failed."""
    if policy.pins is not None and bundle.pin_after(report):
        newest = journal.latest_checkpoint()
        if newest is not None and not any(f.kind == "checkpoint_signature_invalid" for f in report.findings):
            policy.pins.update(policy.log_verifier.name, policy.log_verifier.vkey, newest["size"],
                               bytes.fromhex(newest["root"]))


def run_fleet(args: argparse.Namespace) -> int:
    """`edge-audit fleet DIR DIR ...`: each journal verified alone, completeness merged."""
    for flag in ("journal", "data_dir", "contract", "log_key"):
        if getattr(args, flag, None):
            raise ConfigError(f"--{flag.replace('_', '-')} names one journal's setting: `fleet` takes each "
                              "coordinator's from its DATA_DIR (its journal and pki/log.pub); drop it")
    dirs = [Path(d) for d in args.data_dirs]
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise ConfigError("a DATA_DIR is given twice: give each coordinator's data dir once")
    reports: list[dict[str, Any]] = []
    ok = True
    for data_dir in dirs:
        cli = {"config": args.config, "journal": data_dir_journal(str(data_dir)), "rpc_url": args.rpc_url,
               "recorders": args.recorders, "from_block": args.from_block}
        config = AuditConfig.load(cli)
        journal = open_journal(config)
        try:
            report, policy = _check_journal(config, journal, args)
            _pin_after(report, policy, journal)
        finally:
            journal.close()
        ok = ok and report.ok
        reports.append({"data_dir": str(data_dir), "report": report})
    per_agent, duplicates = completeness.check_fleet([d / "journal.db" for d in dirs])
    fleet = audit.AuditReport()
    completeness.add_findings(fleet, per_agent)
    completeness.add_duplicates(fleet, duplicates)
    ok = ok and fleet.ok
    if args.json:
        print(json.dumps({"ok": ok, "journals": [{"data_dir": r["data_dir"], **r["report"].as_dict()} for r in reports],
                          "completeness": [c.as_dict() for c in per_agent.values()],
                          "duplicates": [d.as_dict() for d in duplicates],
                          "findings": fleet.as_dict()["findings"]}, indent=2))
    else:
        for r in reports:
            print(f"== {r['data_dir']}")
            for line in audit.summarize(r["report"]):
                print(line)
        print(f"== fleet: {len(dirs)} journals, {len(per_agent)} agents, "
              f"{sum(c.stored for c in per_agent.values())} readings")
        for f in fleet.findings:
            print(f"  {f.kind:26} {f.detail}")
        print("RESULT: OK" if ok else "RESULT: FAILED")
    return 0 if ok else 1


def run(args: argparse.Namespace) -> int:
    if args.command == "fleet":
        args.json = bool(getattr(args, "json", False))
        return run_fleet(args)
    cli = {k: getattr(args, k, None) for k in ("config", "journal", "rpc_url", "contract", "recorders", "from_block")}
    cli["journal"] = cli["journal"] or data_dir_journal(getattr(args, "data_dir", None))
    args.json = bool(getattr(args, "json", False))
    config = AuditConfig.load({**cli, "log_key": getattr(args, "log_key", None)})
    if args.command == "verify" and args.bundle is not None:
        return _verify_bundle(args, config)
    journal = open_journal(config)  # read-only: the auditor never creates or changes what it audits
    try:
        if args.command == "list":
            rows = audit.list_records(journal, _filters_of(args))
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                _print_rows(rows)
            return 0
        if args.command == "show":
            shown = audit.show(journal, resolve_task_id(journal, args.task_id))
            if shown is None:
                print(f"edge-audit: no record for task {args.task_id} in {config.journal}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(shown, indent=2))
            else:
                width = max(len(k) for k in shown)
                proof = shown.pop("inclusion_proof")
                anchor = shown.pop("checkpoint_anchor", None)
                for key, value in shown.items():
                    if key in ("received_at", "started_at", "finished_at") and value is not None:
                        value = f"{value} ({_iso(value)})"
                    print(f"{key:{width}}  {value if value is not None else '-'}")
                if proof is None:
                    print("\ninclusion proof: none yet (no signed checkpoint covers this record)")
                else:
                    print(f"\ninclusion proof (c2sp.org/tlog-proof, checkpoint of size {shown['checkpoint_size']}):")
                    print(proof, end="")
                    print(f"\ncheckpoint anchored: {anchor['anchor_state']} tx {anchor['tx_hash'] or '-'} block "
                          f"{anchor['block_number'] if anchor['block_number'] is not None else '-'} chain "
                          f"{anchor['chain_id'] or '-'} contract {anchor['contract'] or '-'}")
            return 0
        if args.command == "export" and args.bundle:
            vkey = _log_verifier(config, journal).vkey
            if args.output:
                with open(args.output, "w") as out:
                    n = bundle.export_bundle(journal, out, _filters_of(args), vkey)
                print(f"exported a bundle of {n} records to {args.output}", file=sys.stderr)
            else:
                bundle.export_bundle(journal, sys.stdout, _filters_of(args), vkey)
            return 0
        if args.command == "export":
            if args.output:
                with open(args.output, "w", newline="") as out:
                    n = audit.export(journal, out, args.format, _filters_of(args))
                print(f"exported {n} records to {args.output}", file=sys.stderr)
            else:
                audit.export(journal, sys.stdout, args.format, _filters_of(args))
            return 0
        report, policy = _check_journal(config, journal, args)
        per_agent = completeness.check(journal.path)  # every reading accounted for: gaps fail
        completeness.add_findings(report, per_agent)
        _pin_after(report, policy, journal)
        return _report(report, args.json, {"completeness": [c.as_dict() for c in per_agent.values()]})
    finally:
        journal.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return guarded(lambda: run(args), lambda: getattr(args, "journal", None) or data_dir_journal(
            getattr(args, "data_dir", None)) or __import__("os").environ.get(ENV["journal"]))
    except (ConfigError, audit.AuditError, LogKeyError, PinError, bundle.BundleError) as exc:
        print(f"edge-audit: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edge-audit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
