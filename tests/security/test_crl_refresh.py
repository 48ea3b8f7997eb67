"""security.crl (what an agent accepts as its new CRL) and security.refusal (a broker's final no)."""

from __future__ import annotations

import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from kombu_mqtt.errors import MqttConnectionError, PublishRejectedError
from security.crl import CrlError, CrlStale, install_crl, load_verified_crl
from security.pki import CertificateAuthority, utcnow
from security.refusal import CERT_REVOKED, NOT_AUTHORIZED, broker_refusal


def crl_pem(ca: CertificateAuthority, *, issued: dt.datetime, next_update: dt.datetime, serials: tuple[int, ...] = ()) -> bytes:
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject).last_update(issued).next_update(next_update)
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(issued).build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def ca(tmp_path):
    authority = CertificateAuthority.create("crl test CA")
    authority.save(tmp_path / "ca")
    return authority


def test_fresh_crl_from_the_fleet_ca_is_installed_and_a_stale_one_refused(ca, tmp_path):
    ca_path, target = tmp_path / "ca" / "ca.pem", tmp_path / "agent" / "crl.pem"
    now = utcnow()
    fresh = crl_pem(ca, issued=now - dt.timedelta(minutes=1), next_update=now + dt.timedelta(days=7), serials=(42,))
    crl, replaced = install_crl(fresh, ca_path, target)
    assert replaced and target.read_bytes() == fresh and crl.get_revoked_certificate_by_serial_number(42)
    assert install_crl(fresh, ca_path, target)[1] is False  # same CRL again: nothing rewritten

    stale = crl_pem(ca, issued=now - dt.timedelta(days=9), next_update=now - dt.timedelta(days=2))
    with pytest.raises(CrlStale, match="next-update passed"):
        install_crl(stale, ca_path, target)
    assert target.read_bytes() == fresh


def test_rollback_and_foreign_crls_are_refused(ca, tmp_path):
    ca_path, target = tmp_path / "ca" / "ca.pem", tmp_path / "agent" / "crl.pem"
    now = utcnow()
    newer = crl_pem(ca, issued=now - dt.timedelta(minutes=1), next_update=now + dt.timedelta(days=7), serials=(7,))
    older = crl_pem(ca, issued=now - dt.timedelta(hours=2), next_update=now + dt.timedelta(days=6))
    install_crl(newer, ca_path, target)
    with pytest.raises(CrlError, match="rollback"):
        install_crl(older, ca_path, target)
    other = CertificateAuthority.create("crl test CA")  # same name, other key
    forged = crl_pem(other, issued=now, next_update=now + dt.timedelta(days=7))
    with pytest.raises(CrlError, match="signature"):
        install_crl(forged, ca_path, target)
    with pytest.raises(CrlError, match="not a PEM CRL"):
        install_crl(b"garbage", ca_path, target)
    assert target.read_bytes() == newer


def test_installed_crl_past_next_update_fails_closed(ca, tmp_path):
    ca_path, path = tmp_path / "ca" / "ca.pem", tmp_path / "crl.pem"
    now = utcnow()
    path.write_bytes(crl_pem(ca, issued=now - dt.timedelta(days=3), next_update=now - dt.timedelta(seconds=1)))
    with pytest.raises(CrlStale, match="expired at"):
        load_verified_crl(path, ca_path)
    path.write_bytes(crl_pem(ca, issued=now - dt.timedelta(minutes=1), next_update=now + dt.timedelta(hours=1)))
    assert load_verified_crl(path, ca_path).next_update_utc > now


def test_broker_refusals_are_told_apart_from_network_failures():
    alert = ssl.SSLError(1, "[SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked (_ssl.c:2580)")
    wrapped = MqttConnectionError("cannot reach MQTT broker 127.0.0.1:1 (...)")
    wrapped.__cause__ = alert
    assert broker_refusal(wrapped) == CERT_REVOKED
    gave_up = MqttConnectionError(f"gave up after 5s: cannot reach MQTT broker 127.0.0.1:1 ({alert})")
    assert broker_refusal(gave_up) == CERT_REVOKED
    assert broker_refusal(MqttConnectionError("MQTT broker x refused client 'a': CONNACK reason 0x87")) == NOT_AUTHORIZED
    assert broker_refusal(PublishRejectedError("MQTT broker refused publish to 't' with reason 0x87: check the ACL")) == NOT_AUTHORIZED
    assert broker_refusal(MqttConnectionError("cannot reach MQTT broker 127.0.0.1:1 ([Errno 111] Connection refused)")) is None
    assert broker_refusal(MqttConnectionError("MQTT connection c lost (keepalive)")) is None
