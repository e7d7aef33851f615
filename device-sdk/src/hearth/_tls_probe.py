"""Looking at a gateway's listener without speaking MQTT to it: whether it speaks TLS, and which
CA it presents. Used where MQTT would say too much: an unpaired device must not send its
CONNECT (and its client id) in plaintext to a TLS listener, and a paired device whose TLS
handshake failed wants to know whether the gateway's CA changed since it paired.

The probe sends a TLS ClientHello and reads the server's first flight, nothing more. It offers
TLS 1.2 only, on purpose: in TLS 1.2 the server's Certificate message travels in the clear, so
the chain can be read from the bytes as they arrive (Python's ``ssl`` gives the unverified
chain only from 3.13 on); the handshake is abandoned before any key is used. A plain MQTT
broker answers a ClientHello by closing the connection (it is no valid MQTT packet).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from dataclasses import dataclass

from hearth.transport import BrokerAddress

__all__ = ["Presented", "connect_ms", "probe"]

_HANDSHAKE = 0x16  # TLS record content types
_ALERT = 0x15
_CERTIFICATE = 11  # TLS handshake message types
_SERVER_HELLO_DONE = 14


@dataclass(frozen=True)
class Presented:
    """What a listener answered to a ClientHello."""

    tls: bool  # it answered in TLS (a handshake or an alert)
    chain: tuple[bytes, ...] = ()  # DER certificates as sent, leaf first (may be empty)

    @property
    def ca_fingerprint(self) -> str:
        """SHA-256 (hex) of the CA among the certificates presented, or "" if none was: the
        self-signed one, else the last of the chain."""
        if not self.chain:
            return ""
        from cryptography import x509

        for der in self.chain:
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError:
                continue
            if cert.issuer == cert.subject:
                return hashlib.sha256(der).hexdigest()
        return hashlib.sha256(self.chain[-1]).hexdigest()


def probe(address: BrokerAddress, timeout_s: float = 2.0) -> Presented:
    """Send a ClientHello to ``address`` and read its answer. Raises OSError when nothing
    listens there (refused, unreachable, no answer within ``timeout_s``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing is trusted or sent: only looked at
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    received = bytearray()
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((address.host, address.port), timeout=timeout_s) as sock:
        while not _first_flight_read(bytes(received)):
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                break  # the server refused us (no client certificate): its flight is in
            else:
                break
            sock.sendall(outgoing.read())
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionError:
                data = b""
            if not data:
                break
            received += data
            incoming.write(data)
    data = bytes(received)
    return Presented(_is_tls(data), tuple(_certificates(data)))


def connect_ms(address: BrokerAddress, timeout_s: float = 2.0) -> float:
    """One TCP connect to ``address``, in ms: a round trip that sends no byte."""
    started = time.perf_counter()
    with socket.create_connection((address.host, address.port), timeout=timeout_s):
        return (time.perf_counter() - started) * 1e3


def _is_tls(data: bytes) -> bool:
    return len(data) >= 5 and data[0] in (_HANDSHAKE, _ALERT) and data[1] == 3


def _records(data: bytes) -> tuple[bytes, bool]:
    """(the handshake bytes of the complete records, whether an alert came)."""
    handshake, alert, at = bytearray(), False, 0
    while at + 5 <= len(data):
        kind, length = data[at], int.from_bytes(data[at + 3 : at + 5], "big")
        body = data[at + 5 : at + 5 + length]
        if len(body) < length:
            break
        if kind == _HANDSHAKE:
            handshake += body
        elif kind == _ALERT:
            alert = True
        else:
            break  # ChangeCipherSpec and after: nothing in the clear any more
        at += 5 + length
    return bytes(handshake), alert


def _messages(handshake: bytes) -> list[tuple[int, bytes]]:
    out, at = [], 0
    while at + 4 <= len(handshake):
        kind, length = handshake[at], int.from_bytes(handshake[at + 1 : at + 4], "big")
        if at + 4 + length > len(handshake):
            break
        out.append((kind, handshake[at + 4 : at + 4 + length]))
        at += 4 + length
    return out


def _first_flight_read(data: bytes) -> bool:
    if data and not _is_tls(data):
        return True  # not TLS: nothing more to learn
    handshake, alert = _records(data)
    return alert or any(kind == _SERVER_HELLO_DONE for kind, _ in _messages(handshake))


def _certificates(data: bytes) -> list[bytes]:
    handshake, _ = _records(data)
    for kind, body in _messages(handshake):
        if kind != _CERTIFICATE or len(body) < 3:
            continue
        certs, at, end = [], 3, 3 + int.from_bytes(body[:3], "big")
        while at + 3 <= min(end, len(body)):
            length = int.from_bytes(body[at : at + 3], "big")
            certs.append(body[at + 3 : at + 3 + length])
            at += 3 + length
        return certs
    return []
