"""Fixtures for the security tests: a fleet PKI with good and bad identities, a real
redis-server on a free loopback port, and in-process Celery workers."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from security.pki import CertificateAuthority, generate_key, make_csr, write_pem, write_private_key
from security.revocation import RevocationStore
from tests.support.mosquitto import FleetPKI
from tests.support.net import free_port, wait_for_port


@dataclass
class Identity:
    name: str
    cert: Path
    key: Path


@dataclass
class SigningPKI:
    """The session CA plus a CRL and identities made for the bad-input matrix."""

    fleet: FleetPKI
    directory: Path
    crl_path: Path
    revocations: RevocationStore

    @property
    def ca(self) -> CertificateAuthority:
        return self.fleet.ca

    @property
    def ca_path(self) -> Path:
        return self.fleet.ca_path

    def identity(self, name: str) -> Identity:
        cert, key = self.fleet.client(name)
        return Identity(name, cert, key)

    def issue(self, name: str, *, ca: CertificateAuthority | None = None,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              rsa: bool = False) -> Identity:
        """An identity with a custom window or issuer (stored under a unique file name)."""
        from cryptography.hazmat.primitives.asymmetric import rsa as rsa_mod

        key = rsa_mod.generate_private_key(65537, 2048) if rsa else generate_key()
        cert = (ca or self.ca).issue(make_csr(key, name), not_before=not_before, not_after=not_after)
        stem = f"{name}-{cert.serial_number:x}"
        write_private_key(key, self.directory / f"{stem}.key")
        write_pem(cert, self.directory / f"{stem}.pem")
        return Identity(name, self.directory / f"{stem}.pem", self.directory / f"{stem}.key")

    def revoke(self, ident: Identity) -> None:
        from security.pki import load_certificate

        self.revocations.revoke(load_certificate(ident.cert), reason="key compromise (test)")
        self.revocations.write_crl(self.ca, self.crl_path)


@pytest.fixture(scope="session")
def signing_pki(test_pki: FleetPKI, tmp_path_factory: pytest.TempPathFactory) -> SigningPKI:
    directory = tmp_path_factory.mktemp("signing-pki")
    store = RevocationStore(directory / "revoked.sqlite")
    crl = directory / "crl.pem"
    store.write_crl(test_pki.ca, crl)
    return SigningPKI(fleet=test_pki, directory=directory, crl_path=crl, revocations=store)


def _redis_binary() -> str:
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(found).exists():
        pytest.skip("redis-server is not installed")
    return found


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway redis-server on a free loopback port (no persistence)."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_port(port, timeout=15)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
