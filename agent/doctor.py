"""`edge-agent doctor`: is this device ready to run, and if not, what to do.

Why: `run` stops at the first problem and `status` only shows local state; a device
operator setting up a device (or answering "why does it not send") wants every check
at once, including the ones that need the network (a real TLS CONNECT to the broker
with this device's certificate), one line each with the fix. The checks themselves
are security.doctor's, shared with the coordinator.
"""

from __future__ import annotations

from security import doctor as d

from .config import CONFIG_NAME, AgentConfig


def run_checks(cfg: AgentConfig, warn_days: int = d.EXPIRY_WARN_DAYS, timeout: float = 5.0) -> list[d.Finding]:
    enroll = "ask the fleet operator for a certificate (`edge-coordinator enroll CSR`), then `edge-agent enroll`"
    renew = ("renew it: `edge-coordinator renew AGENT --csr agent.csr` on the coordinator, "
             "then `edge-agent renew --cert FILE` here")
    out: list[d.Finding] = []
    if cfg.agent_id:
        out.append(d.Finding("agent id", d.OK, f"{cfg.agent_id!r} ({cfg.data_dir / CONFIG_NAME})"))
    else:
        out.append(d.Finding("agent id", d.FAIL, f"no agent_id in {cfg.data_dir / CONFIG_NAME}",
                             "run `edge-agent keygen --id NAME`"))
    out += d.guarded("key", lambda: d.key_file("key", cfg.key_file, "run `edge-agent keygen --id NAME`"))
    if cfg.cert_file.exists():
        out += d.guarded("certificate", lambda: d.certificate(
            "certificate", cfg.cert_file, cfg.ca_file, expected_cn=cfg.agent_id or None, key_path=cfg.key_file,
            fix=renew if cfg.ca_file.exists() else enroll, warn_days=warn_days))
    else:
        out.append(d.Finding("certificate", d.FAIL, f"{cfg.cert_file} is missing", enroll))
    out += d.guarded("crl", lambda: _crl(cfg))
    out += d.guarded("revoked", lambda: _revoked(cfg))
    out += d.guarded("broker", lambda: d.broker(
        cfg.broker_url, cfg.ca_file, cfg.cert_file, cfg.key_file, cfg.agent_id or "agent", timeout=timeout,
        fix=f"check broker_url in {cfg.data_dir / CONFIG_NAME}, the network/firewall (TCP port of the URL) "
            "and that the broker certificate names that host"))
    out += d.guarded("outbox", lambda: d.sqlite_integrity("outbox", cfg.outbox_file))
    out += d.guarded("quarantine", lambda: d.sqlite_integrity("quarantine", cfg.data_dir / "quarantine.sqlite"))
    out += d.guarded("disk", lambda: d.disk_space(cfg.data_dir))
    return out


def _crl(cfg: AgentConfig) -> d.Finding:
    serial = None
    if cfg.cert_file.exists():
        from security.pki import load_certificate

        serial = load_certificate(cfg.cert_file).serial_number
    return d.crl(cfg.crl_file, cfg.ca_file, serial=serial,
                 missing="re-enroll with a bundle that carries crl.pem, or wait for the coordinator's push",
                 fix="wait for the coordinator's next CRL push (it runs `edge-coordinator run`), or re-enroll")


def _revoked(cfg: AgentConfig) -> d.Finding:
    from ledger.sqlite_files import unreadable_reason

    if unreadable_reason(cfg.outbox_file) is not None:
        return d.Finding("revoked", d.WARN, "not checked: the outbox is unreadable (see below)")
    from .revocation import FIX, revoked_state

    mark = revoked_state(cfg)
    if mark:
        return d.Finding("revoked", d.FAIL, f"this device was told it is revoked ({mark.get('detail') or mark.get('reason')})", FIX)
    return d.Finding("revoked", d.OK, "no revocation recorded")
