"""`edge-audit`: list, show, verify, reconcile and export the execution ledger.

Exit codes: 0 OK, 1 verification/reconciliation found problems, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

from ledger import audit, completeness
from ledger.audit_config import ENV, AuditConfig, ConfigError
from ledger.journal import Journal

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
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _common(sub: bool) -> argparse.ArgumentParser:
    """Connection options, accepted before or after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    d = argparse.SUPPRESS if sub else None
    g = p.add_argument_group("where the ledger is")
    g.add_argument("--config", metavar="FILE", default=d, help=f"TOML settings file (env {ENV['config']})")
    g.add_argument("--journal", metavar="PATH", default=d, help=f"journal SQLite file (env {ENV['journal']})")
    g.add_argument("--rpc-url", dest="rpc_url", metavar="URL", default=d,
                   help=f"Ethereum JSON-RPC URL (env {ENV['rpc_url']})")
    g.add_argument("--contract", metavar="ADDR", default=d, help=f"ExecutionLedger address (env {ENV['contract']})")
    g.add_argument("--recorder", dest="recorders", metavar="ADDR", action="append", default=d,
                   help="trust events from this sender too (repeatable); the journal's recorders are always trusted")
    g.add_argument("--json", action="store_true", default=d, help="machine-readable output")
    return p


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
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common(True)
    p = subs.add_parser("list", parents=[common], help="list journal records", epilog=EPILOG,
                        description="List journal records, oldest first.")
    _filters(p)
    p = subs.add_parser("show", parents=[common], help="show one record in full", epilog=EPILOG,
                        description="Show one record: fields, canonical JSON, digests, anchoring.")
    p.add_argument("task_id", metavar="TASK_ID")
    p = subs.add_parser("verify", parents=[common], help="verify every record against the chain and signatures",
                        epilog=EPILOG, description="Recompute each record's digest, compare it with its on-chain "
                        "event, re-verify the signed envelope. Exit 1 on any problem.")
    p.add_argument("--no-signatures", action="store_true", help="skip envelope signature checks")
    p.add_argument("--require-anchored", action="store_true", help="fail on rows not yet on chain")
    p.add_argument("--from-block", type=int, help="first block to scan (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p = subs.add_parser("reconcile", parents=[common], help="journal vs chain: missing, mismatched, unanchored",
                        epilog=EPILOG, description="Report rows missing on chain, mismatched digests, rows not "
                        "anchored yet and chain events with no journal row. Exit 1 on missing/mismatched.")
    p.add_argument("--from-block", type=int, help="first block to scan (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p = subs.add_parser("export", parents=[common], help="export records as JSONL or CSV", epilog=EPILOG,
                        description="Export records (without envelope bytes) as JSONL or CSV.")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    _filters(p)
    return parser


def _filters_of(args: argparse.Namespace) -> audit.Filters:
    return audit.Filters(agent=args.agent, task_name=args.task_name, status=args.status, anchor_state=args.state,
                         since=args.since, until=args.until, limit=args.limit)


def _events(config: AuditConfig, journal: Journal, args: argparse.Namespace):
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
    return audit.fetch_events(w3, address, from_block=from_block, chunk=config.log_chunk, progress=progress)


def _print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'TASK ID':38} {'TASK':22} {'AGENT':16} {'STATUS':9} {'RECEIVED (UTC)':24} {'ANCHOR':10} BLOCK")
    for r in rows:
        print(f"{r['task_id']:38} {r['task_name'][:22]:22} {r['agent_id'][:16]:16} {r['status'][:9]:9} "
              f"{_iso(r['received_at']):24} {r['anchor_state']:10} {r['block_number'] if r['block_number'] is not None else '-'}")
    print(f"{len(rows)} records")


def run(args: argparse.Namespace) -> int:
    cli = {k: getattr(args, k, None) for k in ("config", "journal", "rpc_url", "contract", "recorders")}
    args.json = bool(getattr(args, "json", False))
    config = AuditConfig.load(cli)
    journal = Journal(config.require_journal())
    try:
        if args.command == "list":
            rows = audit.list_records(journal, _filters_of(args))
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                _print_rows(rows)
            return 0
        if args.command == "show":
            shown = audit.show(journal, args.task_id)
            if shown is None:
                print(f"edge-audit: no record for task {args.task_id} in {config.journal}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(shown, indent=2))
            else:
                width = max(len(k) for k in shown)
                for key, value in shown.items():
                    if key in ("received_at", "started_at", "finished_at") and value is not None:
                        value = f"{value} ({_iso(value)})"
                    print(f"{key:{width}}  {value if value is not None else '-'}")
            return 0
        if args.command == "export":
            if args.output:
                with open(args.output, "w", newline="") as out:
                    n = audit.export(journal, out, args.format, _filters_of(args))
                print(f"exported {n} records to {args.output}", file=sys.stderr)
            else:
                audit.export(journal, sys.stdout, args.format, _filters_of(args))
            return 0
        events = _events(config, journal, args)
        recorders = audit.known_recorders(journal, config.recorders)
        if args.command == "verify":
            report = audit.audit(journal, events, recorders, check_signatures=not args.no_signatures,
                                 verifier=audit.default_verifier(), require_anchored=args.require_anchored)
        else:
            report = audit.reconcile(journal, events, recorders)
        per_agent = completeness.check(journal.path)  # every reading accounted for: gaps fail
        completeness.add_findings(report, per_agent)
        if args.json:
            print(json.dumps({**report.as_dict(), "completeness": [c.as_dict() for c in per_agent.values()]}, indent=2))
        else:
            for line in audit.summarize(report):
                print(line)
        return 0 if report.ok else 1
    finally:
        journal.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ConfigError, audit.AuditError) as exc:
        print(f"edge-audit: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edge-audit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
