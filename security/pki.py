"""Certificate authority, CSR enrollment and revocation for the fleet.

Why: every agent proves who it is twice, to the broker (mutual TLS) and to the
coordinator (signed tasks); both checks rest on these certificates. An agent makes
its own EC P-256 key and sends only a CSR, so its private key never leaves it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

DEFAULT_CERT_DAYS = 365
CA_DAYS = 3650


class PKIError(Exception):
    """A certificate operation could not be done; the message says what to fix."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new EC P-256 key: fast to sign on small CPUs, short signatures."""
    return ec.generate_private_key(ec.SECP256R1())


def write_private_key(key: PrivateKey, path: Path) -> None:
    """Write a PEM key readable by its owner only (0600), created with that mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def load_private_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PKIError(f"private key {path} not found: run keygen/init first") from exc
    except ValueError as exc:
        raise PKIError(f"private key {path} is not a PEM key: {exc}") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise PKIError(f"private key {path} must be EC or RSA")
    return key


def write_pem(obj: x509.Certificate | x509.CertificateSigningRequest | x509.CertificateRevocationList, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))


def public_key_der(key: PublicKeyTypes) -> bytes:
    """SubjectPublicKeyInfo DER of any public key: compares keys whatever their type."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise PKIError(f"certificate {path} not found: enroll first") from exc
    except ValueError as exc:
        raise PKIError(f"certificate {path} is not a PEM certificate: {exc}") from exc


def load_csr(path_or_bytes: Path | bytes) -> x509.CertificateSigningRequest:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise PKIError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise PKIError("CSR signature is invalid: regenerate it with `edge-agent keygen`")
    return csr


def common_name(cert: x509.Certificate | x509.CertificateSigningRequest) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise PKIError("certificate has no common name (CN)")
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as lowercase hex: the signer id stored in records."""
    return cert.fingerprint(hashes.SHA256()).hex()


def validate_identity(name: str) -> str:
    """Agent ids become MQTT topic segments and CNs: keep them to a safe alphabet."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    if not name or len(name) > 64 or not set(name) <= allowed or name.startswith("."):
        raise PKIError(
            f"invalid identity {name!r}: use 1-64 characters from letters, digits, '-', '_', '.'"
        )
    return name


def make_csr(key: PrivateKey, name: str) -> x509.CertificateSigningRequest:
    validate_identity(name)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )


@dataclass
class CertificateAuthority:
    """The fleet CA: a key and self-signed certificate, plus the serials it revoked."""

    key: PrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "edgeledger fleet CA", days: int = CA_DAYS) -> CertificateAuthority:
        key = generate_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = utcnow()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, cert=cert)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        directory = Path(directory)
        return cls(key=load_private_key(directory / "ca.key"), cert=load_certificate(directory / "ca.pem"))

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        write_private_key(self.key, directory / "ca.key")
        write_pem(self.cert, directory / "ca.pem")

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        client: bool = True,
        server: bool = False,
        hosts: tuple[str, ...] = (),
        days: int = DEFAULT_CERT_DAYS,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Sign a CSR. CN becomes the identity; SAN carries it (and hosts for servers)."""
        if not csr.is_signature_valid:
            raise PKIError("CSR signature is invalid: regenerate it")
        name = validate_identity(common_name(csr))
        start = not_before or (utcnow() - dt.timedelta(minutes=5))
        end = not_after or (start + dt.timedelta(days=days))
        sans: list[x509.GeneralName] = [x509.DNSName(name)]
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        usages = []
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if not usages:
            raise PKIError("a certificate needs clientAuth or serverAuth usage")
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=isinstance(csr.public_key(), rsa.RSAPublicKey),
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def crl(self, revoked_serials: dict[int, dt.datetime], days: int = 30) -> x509.CertificateRevocationList:
        """A CRL listing the given serials; Mosquitto and the signature checks both read it."""
        now = utcnow()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
        )
        for serial, when in sorted(revoked_serials.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(self.key, hashes.SHA256())


def issue_identity(
    ca: CertificateAuthority,
    directory: Path,
    name: str,
    *,
    client: bool = True,
    server: bool = False,
    hosts: tuple[str, ...] = (),
    days: int = DEFAULT_CERT_DAYS,
) -> tuple[Path, Path]:
    """Convenience for demos and tests: key + CSR + certificate in one step.

    Real agents run `edge-agent keygen` on the device and send only the CSR.
    Returns (cert_path, key_path).
    """
    directory = Path(directory)
    key = generate_key()
    key_path = directory / f"{name}.key"
    cert_path = directory / f"{name}.pem"
    write_private_key(key, key_path)
    write_pem(ca.issue(make_csr(key, name), client=client, server=server, hosts=hosts, days=days), cert_path)
    return cert_path, key_path


@dataclass
class LoopbackPKI:
    """A throwaway CA in one directory, a broker certificate for 127.0.0.1 and client
    certificates on demand: the fleet of a single machine (tests, benchmarks).

    Why here and not with the coordinator's FleetStore: nothing is recorded (no issued
    list, no CRL); it is `issue_identity` with a fixed layout, for code that needs a
    working mutual-TLS fleet and nothing else.
    """

    directory: Path
    ca: CertificateAuthority
    server_cert: Path
    server_key: Path

    @classmethod
    def create(cls, directory: Path, ca_name: str = "edgeledger test CA") -> LoopbackPKI:
        directory.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority.create(ca_name)
        ca.save(directory)
        cert, key = issue_identity(ca, directory, "broker", client=False, server=True, hosts=("127.0.0.1", "localhost"))
        return cls(directory=directory, ca=ca, server_cert=cert, server_key=key)

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    def client(self, name: str) -> tuple[Path, Path]:
        """(cert, key) for a client identity, issued once and reused."""
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        if not cert.exists():
            cert, key = issue_identity(self.ca, self.directory, name)
        return cert, key

    def ssl_options(self, name: str) -> dict[str, str]:
        """kombu `broker_use_ssl` / transport options for a client identity."""
        cert, key = self.client(name)
        return {"ca_certs": str(self.ca_path), "certfile": str(cert), "keyfile": str(key)}
