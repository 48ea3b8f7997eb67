"""`edge-coordinator doctor`: preflight of a coordinator host, one line per check with its fix.

Why: `run` stops at the first missing file (coordinator.preflight) and /healthz only
answers while the daemon runs; before the first start, after a restore or a move to
another host, the operator wants all of it at once: PKI files and their permissions,
the certificates (chain, CN, expiry, the host names in the broker's), agents about to
expire, the CRL, a real TLS CONNECT to the broker and eth_chainId on the chain, a full
integrity scan of the journal, and disk space. Shared checks: security.doctor.
"""

from __future__ import annotations

import json
import time
import urllib.request

from security import doctor as d

from .config import CoordinatorConfig
from .fleet_pki import BROKER_IDENTITY, FleetStore, broker_hosts


def run_checks(cfg: CoordinatorConfig, *, daemon_running: bool, warn_days: int = d.EXPIRY_WARN_DAYS,
               timeout: float = 5.0) -> list[d.Finding]:
    store = FleetStore(cfg)
    repair = f"`edge-coordinator init --repair --data-dir {cfg.data_dir}` (re-issues it from the fleet CA)"
    out: list[d.Finding] = []
    keys = [("CA key", cfg.pki_dir / "ca.key", f"restore {cfg.pki_dir} from a backup")] if cfg.holds_ca else []
    keys.append(("coordinator key", cfg.key_path, repair))  # a peer's data dir holds no CA key (coordinator/peers.py)
    if cfg.managed_broker:
        keys.append(("broker key", store.broker_key, repair))
    for name, path, fix in keys:
        out += d.guarded(name, lambda name=name, path=path, fix=fix: d.key_file(name, path, fix))
    ca_fix = "the fleet CA is expiring: plan a new CA (`init` on a new data dir) and re-enroll every agent"
    out += d.guarded("CA", lambda: _ca(cfg, ca_fix, warn_days))
    out += d.guarded("coordinator", lambda: d.certificate(
        "coordinator", cfg.cert_path, cfg.ca_path, expected_cn=cfg.identity, key_path=cfg.key_path,
        fix="`edge-coordinator renew coordinator`", warn_days=warn_days))
    if cfg.managed_broker:
        out += d.guarded("broker cert", lambda: _broker_cert(cfg, store, warn_days))
    out += d.guarded("agents", lambda: _agents(store, warn_days))
    out += d.guarded("crl", lambda: d.crl(
        cfg.crl_path, cfg.ca_path, missing=repair,
        fix="start `edge-coordinator run` (it re-issues the CRL), or `edge-coordinator init --repair`"))
    down = d.FAIL if daemon_running or not cfg.managed_broker else d.WARN
    out += d.guarded("broker", lambda: d.broker(
        cfg.broker_url, cfg.ca_path, cfg.cert_path, cfg.key_path, cfg.identity, timeout=timeout, down_status=down,
        fix="`edge-coordinator run` starts the managed broker" if cfg.managed_broker and not daemon_running
        else "start the broker, or fix broker.url / broker.port in coordinator.toml (and the firewall)"))
    out += d.guarded("chain", lambda: _chain(cfg, daemon_running, timeout))
    out += d.guarded("journal", lambda: d.sqlite_integrity("journal", cfg.journal_path))
    out += d.guarded("quarantine", lambda: d.sqlite_integrity("quarantine", cfg.quarantine_path))
    out += d.guarded("disk", lambda: d.disk_space(cfg.data_dir))
    return out


def _ca(cfg: CoordinatorConfig, fix: str, warn_days: int) -> d.Finding:
    from security.pki import load_certificate

    return d.expiry("CA expiry", load_certificate(cfg.ca_path), fix, max(warn_days, 90))


def _broker_cert(cfg: CoordinatorConfig, store: FleetStore, warn_days: int) -> list[d.Finding]:
    found = d.certificate("broker", store.broker_cert, cfg.ca_path, expected_cn=BROKER_IDENTITY,
                          key_path=store.broker_key, fix="`edge-coordinator renew broker`", warn_days=warn_days)
    hosts = broker_hosts(store.broker_cert)
    listen = cfg.broker.host
    if listen in ("0.0.0.0", "::") or listen in hosts:
        found.append(d.Finding("broker names", d.OK, f"the broker certificate names {', '.join(hosts)}"))
    else:
        found.append(d.Finding("broker names", d.FAIL, f"broker.host {listen!r} is not in the broker certificate "
                               f"({', '.join(hosts)}): devices connecting to it fail the TLS host check",
                               f"`edge-coordinator renew broker --host {listen}`"))
    return found


def _agents(store: FleetStore, warn_days: int) -> d.Finding:
    """Agents whose newest unrevoked certificate expires within warn_days: renew them now."""
    now = time.time()
    soon = []
    for name in store.active_agents():
        active = store.active_certificates(name, now)
        if active and max(c.not_after for c in active) - now <= warn_days * 86400:
            soon.append(name)
    if soon:
        return d.Finding("agents", d.WARN, f"certificate(s) expiring within {warn_days} days: {', '.join(soon)}",
                         "`edge-agent renew --csr` on each device, `edge-coordinator renew AGENT --csr FILE` here, "
                         "then `edge-agent renew --cert FILE` (docs/OPERATIONS.md)")
    return d.Finding("agents", d.OK, f"{len(store.active_agents())} enrolled, none expiring within {warn_days} days")


def chain_id(url: str, timeout: float) -> int:
    """eth_chainId over JSON-RPC; raises OSError/ValueError/TypeError/KeyError."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return int(json.loads(resp.read())["result"], 16)


def _chain(cfg: CoordinatorConfig, daemon_running: bool, timeout: float) -> d.Finding:
    url = cfg.chain_url
    try:
        cid = chain_id(url, timeout)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        if cfg.managed_chain and not daemon_running:
            return d.Finding("chain", d.WARN, f"{url}: the managed chain is not running ({exc})",
                             "`edge-coordinator run` starts it")
        return d.Finding("chain", d.FAIL, f"{url} does not answer eth_chainId ({exc})",
                         "start the chain node, or fix chain.url / chain.port in coordinator.toml (and the firewall)")
    return d.Finding("chain", d.OK, f"{url} answers eth_chainId = {cid}")
