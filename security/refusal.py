"""Tell a broker's final "no" apart from a network hiccup.

Why: a revoked device used to retry forever. The broker says no in three ways that
retrying cannot fix: the TLS handshake ends with the alert `certificate revoked`
(Mosquitto re-read the CRL), CONNACK refuses the client (not authorized, bad
credentials, banned), or, with the dynamic-security plugin after the client was
removed, every PUBLISH/SUBSCRIBE is answered "not authorized" (0x87). Agents and the
simulated agent stop on these instead of retrying; everything else stays a retry.

The transport reports these as exceptions whose text (or chained cause) carries the
TLS alert or the reason code, so `broker_refusal` looks at the whole exception chain.
With TLS 1.3 the alert comes after the handshake and is usually lost: the client has
already written CONNECT, the broker's close turns into a reset and the client only sees
"connection lost". `probe_certificate` asks the question directly: a handshake, then a
read without writing anything, so the broker's alert is what arrives.
"""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlparse

CERT_REVOKED = "certificate_revoked"
NOT_AUTHORIZED = "not_authorized"

#: CONNACK reasons meaning "this identity may not connect" (MQTT 5).
_REFUSING_CONNACK = {0x86: "bad user name or password", 0x87: "not authorized", 0x8A: "banned",
                     0x8C: "bad authentication method"}


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 16:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def broker_refusal(exc: BaseException) -> str | None:
    """CERT_REVOKED, NOT_AUTHORIZED, or None (a failure worth retrying)."""
    texts = []
    for item in _chain(exc):
        if isinstance(item, ssl.SSLError) and (getattr(item, "reason", None) or "").upper() == "SSLV3_ALERT_CERTIFICATE_REVOKED":
            return CERT_REVOKED
        texts.append(str(item).lower())
    text = " ".join(texts)
    if "certificate revoked" in text or "certificate_revoked" in text:
        return CERT_REVOKED
    for code in _REFUSING_CONNACK:
        if f"connack reason 0x{code:02x}" in text:
            return NOT_AUTHORIZED
    if ("refused publish" in text or "refused subscription" in text) and "0x87" in text:
        return NOT_AUTHORIZED
    return None


def describe(reason: str) -> str:
    """What the operator of a refused device should do, one line."""
    if reason == CERT_REVOKED:
        return ("the broker refused this device's certificate as revoked: re-enroll it "
                "(edge-agent keygen --force, have the coordinator sign the CSR, edge-agent enroll) or contact the fleet operator")
    return ("the broker refused this device (not authorized): its certificate was revoked or removed from the broker; "
            "re-enroll it or contact the fleet operator")


def probe_certificate(broker_url: str, ca_certs: str, certfile: str, keyfile: str, timeout: float = 5.0) -> str | None:
    """CERT_REVOKED when the broker refuses this certificate as revoked, else None.

    A healthy MQTT broker waits for CONNECT and says nothing, so silence until
    `timeout` (or any other failure: unreachable, reset) means "not known revoked".
    """
    parsed = urlparse(broker_url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 8883
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_certs)
    ctx.load_cert_chain(certfile, keyfile)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(timeout)
                tls.recv(1)  # TLS 1.3: the alert arrives here; TLS 1.2: already in the handshake
    except ssl.SSLError as exc:
        return CERT_REVOKED if broker_refusal(exc) == CERT_REVOKED else None
    except OSError:
        return None
    return None
