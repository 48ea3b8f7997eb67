"""Key generation and enrollment on the device.

Why here and not in the coordinator: the private key is made on the device and never
leaves it; only the CSR travels. Enrollment installs what the coordinator signed,
after checking it really belongs to this key and chains to the given CA.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from security import pki

from .config import CONFIG_NAME, AgentConfig, read_toml, update_toml
from .errors import AgentError


def _pki(call, *args):
    try:
        return call(*args)
    except pki.PKIError as exc:
        raise AgentError(str(exc)) from exc


def keygen(cfg: AgentConfig, agent_id: str, *, force: bool = False) -> Path:
    """Create the EC P-256 key (0600) and a CSR for `agent_id`; returns the CSR path."""
    _pki(pki.validate_identity, agent_id)
    if cfg.key_file.exists() and not force:
        raise AgentError(f"{cfg.key_file} already exists: pass --force to replace this device's key")
    key = pki.generate_key()
    pki.write_private_key(key, cfg.key_file)
    csr = pki.make_csr(key, agent_id)
    pki.write_pem(csr, cfg.csr_file)
    update_toml(cfg.data_dir, agent_id=agent_id)
    return cfg.csr_file


def _install(source: Path, target: Path) -> None:
    """Copy into the data dir; the installed file itself (renewal: `--ca <data-dir>/ca.pem`) stays as it is."""
    if target.exists() and source.resolve() == target.resolve():
        return
    shutil.copyfile(source, target)


def require_certificate_identity(cfg: AgentConfig) -> None:
    """`run` refuses an agent id other than its certificate's CN.

    Why: the coordinator binds every task to the signer's CN, so an agent configured as
    B but holding A's certificate would send readings that are journaled (or refused) as
    A's; it must fail at start with one line, not produce mislabelled data."""
    cert = _pki(pki.load_certificate, cfg.cert_file)
    cn = _pki(pki.common_name, cert)
    if cn != cfg.agent_id:
        raise AgentError(f"agent id {cfg.agent_id!r} differs from the certificate's CN {cn!r} ({cfg.cert_file}): "
                         f"set agent_id = \"{cn}\" in {cfg.data_dir / CONFIG_NAME} (and unset EDGE_AGENT_AGENT_ID), "
                         "or enroll a certificate for this id")


def _public_der(obj) -> bytes:
    return obj.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_certificate(cfg: AgentConfig, cert: x509.Certificate, ca: x509.Certificate) -> None:
    """The cert is ours (same key, same id), signed by the CA, and currently valid."""
    key = _pki(pki.load_private_key, cfg.key_file)
    if _public_der(cert) != _public_der(key):
        raise AgentError("certificate does not match this device's key: enroll the CSR made by `edge-agent keygen`")
    cn = _pki(pki.common_name, cert)
    if cfg.agent_id and cn != cfg.agent_id:
        raise AgentError(f"certificate is for {cn!r} but this agent is {cfg.agent_id!r}: enroll the right certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        raise AgentError(f"certificate is not signed by the given CA ({exc}): pass the fleet's ca.pem") from exc
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        raise AgentError(f"certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}: ask the coordinator for a new one")


@dataclass
class BundleFiles:
    cert: Path
    ca: Path
    crl: Path | None
    key: Path | None
    settings: dict


def read_bundle(bundle: Path, agent_id: str) -> BundleFiles:
    """A coordinator bundle dir: ca.pem, <id>.pem, optional crl.pem, <id>.key, agent.toml."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise AgentError(f"bundle {bundle} is not a directory: pass the directory `edge-coordinator enroll` wrote")
    settings = read_toml(bundle / CONFIG_NAME)
    agent_id = agent_id or str(settings.get("agent_id") or "")
    ca = bundle / "ca.pem"
    candidates = [bundle / f"{agent_id}.pem", bundle / "agent.pem"] if agent_id else [bundle / "agent.pem"]
    if not agent_id:
        candidates += sorted(p for p in bundle.glob("*.pem") if p.name not in ("ca.pem", "crl.pem"))
    cert = next((p for p in candidates if p.exists()), None)
    if not ca.exists() or cert is None:
        raise AgentError(f"bundle {bundle} needs ca.pem and {agent_id or '<agent id>'}.pem")
    crl = bundle / "crl.pem"
    key = bundle / f"{cert.stem}.key"
    return BundleFiles(
        cert=cert,
        ca=ca,
        crl=crl if crl.exists() else None,
        key=key if key.exists() else None,
        settings=settings,
    )


def _install_log_key(source: Path, target: Path) -> None:
    """The transparency log's vkey from the bundle (agent/witness.py); a different key than
    the one this agent already witnesses is refused, never silently replaced."""
    offered = source.read_text().strip()
    if target.exists() and target.read_text().strip() != offered:
        raise AgentError(f"the bundle's log key differs from the one this agent witnesses ({target}): if the "
                         f"coordinator's log key really changed, check why with an auditor, then remove {target}")
    target.write_text(offered + "\n")


def enroll(
    cfg: AgentConfig,
    *,
    cert_path: Path | None = None,
    ca_path: Path | None = None,
    crl_path: Path | None = None,
    bundle: Path | None = None,
    broker_url: str | None = None,
) -> x509.Certificate:
    """Install the signed certificate (+ CA, CRL, settings) into the data dir."""
    settings: dict = {}
    if bundle is not None:
        files = read_bundle(bundle, cfg.agent_id)
        cert_path, ca_path, crl_path = files.cert, files.ca, files.crl
        settings = {k: v for k, v in files.settings.items()
                    if k in ("broker_url", "sensors", "interval", "broker_heartbeat", "command_signers")}
        if files.key is not None and not cfg.key_file.exists():
            # Demo bundles may carry a key made by the coordinator; a real device keeps its own.
            cfg.key_file.parent.mkdir(parents=True, exist_ok=True)
            pki.write_private_key(_pki(pki.load_private_key, files.key), cfg.key_file)
    if cert_path is None or ca_path is None:
        raise AgentError("enroll needs --cert and --ca (or --bundle DIR)")
    if not cfg.key_file.exists():
        raise AgentError(f"no private key {cfg.key_file}: run `edge-agent keygen --id NAME` first")
    cert = _pki(pki.load_certificate, Path(cert_path))
    ca = _pki(pki.load_certificate, Path(ca_path))
    check_certificate(cfg, cert, ca)
    if crl_path is not None:
        try:
            crl = x509.load_pem_x509_crl(Path(crl_path).read_bytes())
        except (OSError, ValueError) as exc:
            raise AgentError(f"CRL {crl_path} unreadable ({exc}): pass the fleet's crl.pem") from exc
        from security.crl import CrlError, check_signed_by

        try:
            check_signed_by(crl, ca)
        except CrlError as exc:
            raise AgentError(f"CRL {crl_path} refused ({exc}): pass the fleet's crl.pem") from exc
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise AgentError("this certificate is revoked in the given CRL: ask the coordinator for a new one")
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    pki.write_pem(cert, cfg.cert_file)
    _install(Path(ca_path), cfg.ca_file)
    if crl_path is not None:
        _install(Path(crl_path), cfg.crl_file)
    if bundle is not None and (Path(bundle) / "log.pub").exists():
        _install_log_key(Path(bundle) / "log.pub", cfg.data_dir / "log.pub")
    if broker_url:
        settings["broker_url"] = broker_url
    update_toml(cfg.data_dir, agent_id=_pki(pki.common_name, cert), **settings)
    from .revocation import clear_revoked

    clear_revoked(cfg)  # a new, unrevoked certificate: `run` may start again (the outbox is kept)
    return cert


def renew_csr(cfg: AgentConfig) -> Path:
    """A fresh CSR for this device's existing key and id (renewal keeps the key)."""
    cfg.require_identity()
    key = _pki(pki.load_private_key, cfg.key_file)
    pki.write_pem(_pki(pki.make_csr, key, cfg.agent_id), cfg.csr_file)
    return cfg.csr_file


def renew_install(cfg: AgentConfig, cert_path: Path) -> x509.Certificate:
    """Check the renewed certificate (this key, this id, the installed CA, not revoked) and
    replace the installed one atomically: a reader (a starting agent) sees the old file or
    the new one, never half of either. The installed CA and CRL stay as they are."""
    cfg.require_identity()
    cert = _pki(pki.load_certificate, Path(cert_path))
    ca = _pki(pki.load_certificate, cfg.ca_file)
    check_certificate(cfg, cert, ca)
    if cfg.crl_file.exists():
        from security.crl import parse_crl

        try:
            revoked = parse_crl(cfg.crl_file.read_bytes()).get_revoked_certificate_by_serial_number(cert.serial_number)
        except pki.PKIError:
            revoked = None  # a damaged local CRL is `doctor`'s and the next push's business
        if revoked is not None:
            raise AgentError("the new certificate is revoked in the installed CRL: ask the coordinator for another one")
    if cfg.cert_file.exists():
        old = _pki(pki.load_certificate, cfg.cert_file)
        if old.serial_number == cert.serial_number:
            raise AgentError(f"{cert_path} is the certificate already installed: renew it on the coordinator first "
                             f"(`edge-coordinator renew {cfg.agent_id} --csr agent.csr`)")
    import os
    import tempfile

    from cryptography.hazmat.primitives import serialization

    fd, tmp = tempfile.mkstemp(dir=cfg.cert_file.parent, prefix=f".{cfg.cert_file.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, cfg.cert_file)
    return cert


def reload_certificate(app, cfg: AgentConfig) -> x509.Certificate:
    """Make a running agent sign with the certificate now installed (after `renew --cert`).

    Why only the certificate: renewal keeps the key, so the signing identity needs only
    its certificate text swapped; the TLS connections load the file again whenever they
    are made anew. The installed file is checked like at enrolment first: this key, this
    id, the installed CA, not expired (fails closed: the current certificate stays)."""
    cert = _pki(pki.load_certificate, cfg.cert_file)
    check_certificate(cfg, cert, _pki(pki.load_certificate, cfg.ca_file))
    from security.app_signing import signing_context
    from security.envelope import certificate_pem

    ctx = signing_context(app)
    if ctx is not None:
        ctx.identity.cert_pem = certificate_pem(cert)
    return cert


def crl_summary(cfg: AgentConfig) -> dict:
    """The installed CRL for `status`: fresh / stale / invalid, and its next update."""
    if not cfg.crl_file.exists():
        return {"installed": False}
    from security.crl import CrlStale, load_verified_crl, parse_crl

    out: dict = {"installed": True, "state": "fresh", "next_update": None}
    try:
        crl = parse_crl(cfg.crl_file.read_bytes())
        out["next_update"] = crl.next_update_utc.isoformat() if crl.next_update_utc else None
        load_verified_crl(cfg.crl_file, cfg.ca_file)
    except CrlStale as exc:
        out.update(state="stale", error=str(exc))
    except (pki.PKIError, OSError) as exc:
        out.update(state="invalid", error=str(exc))
    return out


def certificate_summary(cfg: AgentConfig) -> dict:
    """Subject, serial and expiry of the installed certificate (for `status`)."""
    if not cfg.cert_file.exists():
        return {"enrolled": False}
    cert = _pki(pki.load_certificate, cfg.cert_file)
    expires = cert.not_valid_after_utc
    days = (expires - dt.datetime.now(dt.UTC)).total_seconds() / 86400
    return {
        "enrolled": True,
        "subject": _pki(pki.common_name, cert),
        "fingerprint": pki.fingerprint(cert),
        "expires": expires.isoformat(),
        "days_left": round(days, 1),
    }
