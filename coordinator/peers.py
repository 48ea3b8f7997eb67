"""`edge-coordinator peer NAME`: a second ingest coordinator's data dir, made on the CA host.

Why on the CA host: a peer must present a certificate of the same fleet CA (agents accept
receipts and commands only from the CNs in their `command_signers`, the broker gives the
coordinator's rights by CN), but the CA key must not be copied around. So the first
coordinator issues the peer's certificate and key into a new data dir (copy it to the
peer's host privately, like a backup of `pki/`), gives the CN the coordinator's broker
rights (dynsec, now and at every broker start) and lists it under `peers`.

The peer has its own identity, journal, log key and recorder account (`chain.private_key`,
which must differ from every other coordinator's: one account per writer keeps nonces
apart), and uses the first coordinator's broker and chain by URL: it manages neither.
It holds no CA key, so it neither re-issues nor pushes the CRL; the first coordinator does
(copy `pki/crl.pem` to the peer after a revocation: its signature checks re-read the file).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from security.pki import PKIError, validate_identity

from .config import CoordinatorConfig, save_config
from .errors import CoordinatorError
from .fleet_pki import RESERVED_NAMES, FleetStore


def make_peer(cfg: CoordinatorConfig, name: str, out: Path, *, chain_key: str, http_port: int,
              days: int = 365) -> CoordinatorConfig:
    """Issue `name`'s certificate into data dir `out`, write its coordinator.toml and log key,
    and add `name` to this coordinator's peers. Returns the peer's configuration."""
    try:
        validate_identity(name)
    except PKIError as exc:
        raise CoordinatorError(str(exc)) from None
    if name in (cfg.identity, *RESERVED_NAMES):
        raise CoordinatorError(f"{name!r} is this coordinator's or a reserved identity: pick another peer name")
    store = FleetStore(cfg)
    if not store.exists():
        raise CoordinatorError(f"{cfg.data_dir} holds no fleet CA key: run `peer` on the first coordinator's data dir")
    if name not in cfg.peers and store.active_certificates(name):
        raise CoordinatorError(f"{name!r} already has a certificate (an agent?): pick another peer name, or "
                               f"`edge-coordinator revoke {name}` first")
    if not chain_key:
        raise CoordinatorError("--chain-key is required: the peer's own funded recorder account key (never the "
                               "first coordinator's: two writers on one account collide on nonces)")
    own_key = cfg.chain.private_key
    if own_key and chain_key.lower().removeprefix("0x") == own_key.lower().removeprefix("0x"):
        raise CoordinatorError("--chain-key is this coordinator's own recorder account: give the peer its own")
    out = Path(out).resolve()
    if (out / "pki").exists() or (out / "coordinator.toml").exists():
        raise CoordinatorError(f"{out} already holds a data dir: pick another --out")
    peer = replace(cfg, data_dir=out, identity=name, peers=[cfg.identity, *[p for p in cfg.peers if p != name]],
                   broker=replace(cfg.broker, url=cfg.broker_url), chain=replace(cfg.chain, url=cfg.chain_url,
                   private_key=chain_key, contract_address=""), http=replace(cfg.http, port=http_port))
    peer.pki_dir.mkdir(parents=True)
    store.issue_peer(name, peer.pki_dir, days=days)
    for path in (cfg.ca_path, cfg.crl_path):
        shutil.copyfile(path, peer.pki_dir / path.name)
    from .tlog_setup import coordinator_log_key

    coordinator_log_key(peer)  # its own transparency log key (pki/log.key, log.pub)
    save_config(peer)
    if name not in cfg.peers:
        cfg.peers = [*cfg.peers, name]
        save_config(cfg)
    return peer
