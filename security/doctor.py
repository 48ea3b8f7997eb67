"""Preflight checks shared by `edge-agent doctor` and `edge-coordinator doctor`.

Why one module: both tools check the same things about an identity (key permissions,
chain to the fleet CA, CN, expiry, CRL, a real TLS CONNECT to the broker) and about
their SQLite files and disk; the agent and the coordinator never import each other,
so the checks live here, built on the product's own code (security.pki, security.crl,
ledger.sqlite_files) rather than a second implementation. Every check returns a
`Finding`: one line with OK/WARN/FAIL and, when not OK, the fix.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from cryptography import x509

from . import exit_codes
from .pki import PKIError, common_name, load_certificate, load_private_key, public_key_der

OK, WARN, FAIL = "OK", "WARN", "FAIL"

#: Warn when a certificate expires within this many days (the `agents` default too).
EXPIRY_WARN_DAYS = 14
#: Free space below which the disk check warns / fails (bytes).
DISK_WARN = 500 * 1024 * 1024
DISK_FAIL = 50 * 1024 * 1024


@dataclass(frozen=True)
class Finding:
    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<18} {self.detail}"
        return f"{text}\n      fix: {self.fix}" if self.status != OK and self.fix else text


def guarded(name: str, check: Callable[[], Finding | list[Finding]]) -> list[Finding]:
    """Run one check; a check that raises is a FAIL naming the exception, never a crashed doctor."""
    try:
        found = check()
    except Exception as exc:  # noqa: BLE001 - a preflight must report whatever a check meets
        return [Finding(name, FAIL, f"check raised {type(exc).__name__}: {exc}", "see the message; fix the file it names")]
    return found if isinstance(found, list) else [found]


def report(tool: str, findings: list[Finding], as_json: bool) -> int:
    """Print one line per finding (or one JSON document); exit OK or PREFLIGHT_FAILED."""
    failed = any(f.status == FAIL for f in findings)
    if as_json:
        print(json.dumps({"ok": not failed, "checks": [asdict(f) for f in findings]}, indent=2, sort_keys=True))
    else:
        for f in findings:
            print(f.line())
        counts = {s: sum(f.status == s for f in findings) for s in (OK, WARN, FAIL)}
        print(f"{tool} doctor: {counts[OK]} ok, {counts[WARN]} warning(s), {counts[FAIL]} failure(s)")
    return exit_codes.PREFLIGHT_FAILED if failed else exit_codes.OK


# -- identity ---------------------------------------------------------------
def key_file(name: str, path: Path, fix_missing: str) -> Finding:
    """The private key exists, parses, and is readable by its owner only."""
    if not path.is_file():
        return Finding(name, FAIL, f"{path} is missing", fix_missing)
    mode = path.stat().st_mode & 0o777
    try:
        load_private_key(path)
    except PKIError as exc:
        return Finding(name, FAIL, str(exc), fix_missing)
    if mode & 0o077:
        return Finding(name, FAIL, f"{path} is readable by group/others (mode {mode:04o})", f"chmod 600 {path}")
    return Finding(name, OK, f"{path} (mode {mode:04o})")


def certificate(name: str, cert_path: Path, ca_path: Path, *, expected_cn: str | None, key_path: Path | None,
                fix: str, warn_days: int = EXPIRY_WARN_DAYS, now: dt.datetime | None = None) -> list[Finding]:
    """Chain to the fleet CA, CN, key match, validity window: one finding each."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        cert = load_certificate(cert_path)
        ca = load_certificate(ca_path)
    except PKIError as exc:
        return [Finding(f"{name} chain", FAIL, str(exc), fix)]
    out: list[Finding] = []
    try:
        cert.verify_directly_issued_by(ca)
        out.append(Finding(f"{name} chain", OK, f"{cert_path} is signed by the fleet CA {ca_path}"))
    except (ValueError, TypeError) as exc:
        out.append(Finding(f"{name} chain", FAIL, f"{cert_path} is not signed by the fleet CA {ca_path} ({exc})", fix))
    cn = common_name(cert)
    if expected_cn is not None:
        if cn == expected_cn:
            out.append(Finding(f"{name} CN", OK, f"CN {cn!r} is the configured id"))
        else:
            out.append(Finding(f"{name} CN", FAIL, f"certificate CN {cn!r} differs from the configured id {expected_cn!r}",
                               f"set the id to {cn!r}, or install a certificate issued for {expected_cn!r}"))
    if key_path is not None and key_path.is_file():
        try:
            if public_key_der(cert.public_key()) != public_key_der(load_private_key(key_path).public_key()):
                out.append(Finding(f"{name} key", FAIL, f"{cert_path} does not belong to the key {key_path}", fix))
        except PKIError:
            pass  # reported by the key check
    out.append(expiry(f"{name} expiry", cert, fix, warn_days, now))
    return out


def expiry(name: str, cert: x509.Certificate, fix: str, warn_days: int = EXPIRY_WARN_DAYS,
           now: dt.datetime | None = None) -> Finding:
    now = now or dt.datetime.now(dt.UTC)
    until = cert.not_valid_after_utc
    serial = f"serial {cert.serial_number:x}"
    if cert.not_valid_before_utc > now:
        return Finding(name, FAIL, f"{serial} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                       "check this host's clock")
    if until <= now:
        return Finding(name, FAIL, f"{serial} expired {until:%Y-%m-%d %H:%M} UTC", fix)
    days = (until - now).total_seconds() / 86400
    if days <= warn_days:
        return Finding(name, WARN, f"{serial} expires in {days:.1f} day(s) ({until:%Y-%m-%d} UTC)", fix)
    return Finding(name, OK, f"{serial} valid until {until:%Y-%m-%d} UTC ({days:.0f} days)")


def crl(crl_path: Path, ca_path: Path, *, missing: str, fix: str, serial: int | None = None) -> Finding:
    """The CRL is the fleet CA's, not past next-update, and (with `serial`) does not list us."""
    from .crl import CrlError, load_verified_crl

    if not crl_path.exists():
        return Finding("crl", WARN, f"no CRL at {crl_path}: revocations are not checked", missing)
    try:
        got = load_verified_crl(crl_path, ca_path)
    except (CrlError, PKIError) as exc:
        return Finding("crl", FAIL, str(exc), fix)
    if serial is not None and got.get_revoked_certificate_by_serial_number(serial) is not None:
        return Finding("crl", FAIL, f"the CRL lists this certificate (serial {serial:x}): it is revoked",
                       "ask the fleet operator to re-enroll this device")
    assert got.next_update_utc is not None
    return Finding("crl", OK, f"signed by the fleet CA, next update {got.next_update_utc:%Y-%m-%d %H:%M} UTC")


# -- reachability -----------------------------------------------------------
def mqtt_connect(url: str, ca: Path, cert: Path, key: Path, identity: str, timeout: float = 5.0) -> str | None:
    """A real MQTT v5 CONNECT over TLS with the identity's certificate; None when CONNACK accepts.

    A random client id (never the running agent's): the probe must not take over the
    session of the process it checks."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"doctor-{identity}-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    result: dict[str, int] = {}
    client.on_connect = lambda _c, _u, _f, rc, _p: result.__setitem__("rc", int(rc.value))
    if parsed.scheme == "mqtts":
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
        client.tls_set_context(ctx)
    try:
        client.connect(host, port, keepalive=10)
    except ssl.SSLCertVerificationError as exc:
        return (f"TLS check of the broker's certificate failed ({exc.verify_message}): the broker certificate must "
                f"carry {host!r} as a subject alternative name and be signed by the fleet CA")
    except (OSError, ssl.SSLError) as exc:
        return f"cannot reach {host}:{port} ({exc})"
    deadline = time.monotonic() + timeout
    try:
        while "rc" not in result and time.monotonic() < deadline:
            if client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS and "rc" not in result:
                return f"{host}:{port} closed the connection during CONNECT (certificate refused or revoked?)"
    finally:
        client.disconnect()
    if "rc" not in result:
        return f"no CONNACK from {host}:{port} within {timeout:g}s"
    if result["rc"] >= 0x80:
        return f"{host}:{port} refused the CONNECT (reason 0x{result['rc']:02x})"
    return None


def broker(url: str, ca: Path, cert: Path, key: Path, identity: str, *, fix: str, down_status: str = FAIL,
           timeout: float = 5.0) -> Finding:
    if not url:
        return Finding("broker", FAIL, "no broker URL configured", fix)
    for path in (ca, cert, key):
        if not path.is_file():
            return Finding("broker", FAIL, f"not tried: {path} is missing", "fix the identity checks above first")
    error = mqtt_connect(url, ca, cert, key, identity, timeout)
    if error is None:
        return Finding("broker", OK, f"{url}: TLS handshake and MQTT CONNECT as {identity!r} accepted")
    status = down_status if error.startswith("cannot reach") else FAIL
    return Finding("broker", status, f"{url}: {error}", fix)


# -- files ------------------------------------------------------------------
def sqlite_integrity(name: str, path: Path, fix_missing: str = "") -> Finding:
    """A full `PRAGMA quick_check` (every page, read-only): the scan too slow for start-up."""
    if not path.exists():
        return Finding(name, OK if not fix_missing else WARN, f"{path} does not exist yet (created when needed)",
                       fix_missing)
    recover = (f"stop the service, then `sqlite3 {path} .recover | sqlite3 {path}.recovered`, check it and move it "
               "in place, or restore a backup")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return Finding(name, FAIL, f"{path} is corrupt or not SQLite ({exc})", recover)
    if rows != ["ok"]:
        return Finding(name, FAIL, f"{path} fails quick_check: {'; '.join(rows[:3])}", recover)
    return Finding(name, OK, f"{path} passes quick_check ({path.stat().st_size} bytes)")


def disk_space(path: Path, warn: int = DISK_WARN, fail: int = DISK_FAIL) -> Finding:
    target = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(target).free
    text = f"{free / 1024 ** 2:.0f} MiB free on the file system of {path}"
    fix = f"free space on the file system holding {path} (or move the data dir)"
    if free < fail:
        return Finding("disk", FAIL, text, fix)
    if free < warn:
        return Finding("disk", WARN, text, fix)
    return Finding("disk", OK, text)
