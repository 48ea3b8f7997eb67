"""PKI: agent-side key + CSR, issued certificate profile, coordinator cert, key modes,
revocation store and CRL."""

from __future__ import annotations

import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from security.metrics import REFUSAL_REASONS, REFUSALS, Counter
from security.pki import (
    CertificateAuthority,
    PKIError,
    common_name,
    generate_key,
    issue_identity,
    load_csr,
    load_private_key,
    make_csr,
    write_private_key,
)
from security.quarantine import Quarantine
from security.revocation import RevocationStore, load_crl
from security.trust import TrustStore


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("unit CA")


def test_agent_key_is_p256_and_written_0600(tmp_path):
    key = generate_key()
    assert isinstance(key.curve, ec.SECP256R1)
    path = tmp_path / "dev" / "agent.key"
    write_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_private_key(path).private_numbers() == key.private_numbers()


def test_ca_save_writes_key_0600(ca, tmp_path):
    ca.save(tmp_path)
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert CertificateAuthority.load(tmp_path).cert == ca.cert


def test_only_the_csr_leaves_the_device_and_the_cert_has_the_agent_profile(ca):
    key = generate_key()  # stays on the device
    csr_pem = make_csr(key, "agent-7").public_bytes(Encoding.PEM)
    assert b"PRIVATE" not in csr_pem
    cert = ca.issue(load_csr(csr_pem))
    assert common_name(cert) == "agent-7"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["agent-7"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert.verify_directly_issued_by(ca.cert)


def test_coordinator_and_broker_certificates(ca, tmp_path):
    cert_path, key_path = issue_identity(ca, tmp_path, "coordinator")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert common_name(cert) == "coordinator"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    broker_path, _ = issue_identity(ca, tmp_path, "broker", client=False, server=True, hosts=("127.0.0.1", "localhost"))
    broker = x509.load_pem_x509_certificate(broker_path.read_bytes())
    eku = broker.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


@pytest.mark.parametrize("name", ["", "a/b", "agent+1", "#", ".hidden", "x" * 65, "agent 1"])
def test_unsafe_identities_are_refused(name):
    with pytest.raises(PKIError, match="invalid identity"):
        make_csr(generate_key(), name)


def test_tampered_csr_is_refused(ca):
    other = make_csr(generate_key(), "agent-x")
    pem = other.public_bytes(Encoding.PEM)
    der = bytearray(other.public_bytes(Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature
    bad = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(PKIError, match="signature is invalid"):
        ca.issue(bad)
    assert load_csr(pem).is_signature_valid


def test_revocation_store_writes_a_crl_the_trust_store_honours(ca, tmp_path):
    ca_path = tmp_path / "ca.pem"
    ca.save(tmp_path)
    store = RevocationStore(tmp_path / "revoked.sqlite")
    crl_path = tmp_path / "crl.pem"
    store.write_crl(ca, crl_path)
    assert list(load_crl(crl_path)) == []
    cert_path, _ = issue_identity(ca, tmp_path, "agent-r")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    trust = TrustStore(ca_path, crl_path)
    assert trust.validate(cert).agent_id == "agent-r"
    assert store.revoke(cert, reason="lost") == cert.serial_number
    assert store.revoke(cert) == cert.serial_number  # idempotent
    assert store.is_revoked(cert.serial_number) and store.identities() == {cert.serial_number: "agent-r"}
    store.write_crl(ca, crl_path)
    crl = load_crl(crl_path)
    assert crl.is_signature_valid(ca.cert.public_key())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    from security.signing import SignatureRefused

    with pytest.raises(SignatureRefused, match="cert_revoked"):
        trust.validate(cert)  # the CRL file changed on disk: re-read without restart


def test_a_crl_from_another_ca_is_refused(ca, tmp_path):
    ca.save(tmp_path)
    other = CertificateAuthority.create("other CA")
    RevocationStore(tmp_path / "r.sqlite").write_crl(other, tmp_path / "crl.pem")
    with pytest.raises(PKIError, match="not signed by the fleet CA"):
        TrustStore(tmp_path / "ca.pem", tmp_path / "crl.pem")


def test_metrics_counter_is_thread_safe_and_starts_with_known_labels():
    c = Counter("test_total", "A test counter.", known=("a", "b"))
    assert c.snapshot() == {"a": 0, "b": 0}
    threads = [threading.Thread(target=lambda: [c.inc("x") for _ in range(1000)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c.inc('we"ird')
    assert c.get("x") == 8000 and c.total() == 8001
    assert c.snapshot() == {"a": 0, "b": 0, "x": 8000, 'we"ird': 1}
    assert set(REFUSAL_REASONS) <= set(REFUSALS.snapshot())


def test_quarantine_keeps_raw_bytes_and_headers(tmp_path):
    q = Quarantine(tmp_path / "q.sqlite")
    rid = q.add("replay", "seen before", b"\x00\xffraw", headers={"id": "t1", "task": "edge.ingest"},
                signer="agent-a", task_id="t1", task_name="edge.ingest")
    row = q.rows("replay")[0]
    assert row.id == rid and row.body == b"\x00\xffraw" and row.headers["task"] == "edge.ingest"
    assert row.signer == "agent-a" and q.count() == 1 and q.count("stale") == 0
