"""Pairing this device with a gateway, and the credentials that pairing leaves behind.

>>> from hearth.pairing import pair                               # doctest: +SKIP
>>> pair("7KQ2-M9XD-3FHA", "192.168.1.20:8884", ca_fingerprint="3f1c…", device_id="cam-1")

What happens (docs/protocol.md §16): fetch the gateway's CA over TLS without verification and
check it against the fingerprint (given, or from the mDNS TXT record ``ca``); reconnect trusting
that CA alone; send a fresh key's CSR with an HMAC proving the code; check the gateway's proof in
the answer; store key, certificate and CA. The code never leaves the device.

Where it is stored: ``$HEARTH_CONFIG_DIR`` (default ``$XDG_CONFIG_HOME/hearth``, i.e.
``~/.config/hearth``) ``/gateways/GATEWAY_ID/``: ``pairing.json``, ``ca.pem``, ``device.pem``,
``device.key``; the directories 0700, the files 0600. ``hearth.Client`` finds them by gateway id
or address (``hearth._identity``, re-exported here) and then connects with mutual TLS as the
paired device id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import queue
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hearth._identity import (
    ENV_CLIENT_ID,
    ENV_CONFIG_DIR,
    Pairing,
    config_dir,
    default_client_id,
    find_pairing,
    identity_for,
    pairings,
)
from hearth.discovery import GatewayInfo, discover
from hearth.errors import ErrorCode, GatewayUnavailable, HearthError, ProtocolError
from hearth.protocol import Error, encode
from hearth.protocol.pairing import (
    PairCa,
    PairHello,
    PairingReply,
    PairRequest,
    PairResult,
    decode_pairing_reply,
    device_proof,
    gateway_proof,
    pair_reply_topic,
    pair_request_topic,
    pairing_key,
)
from hearth.transport import BrokerAddress, TlsFiles, connect, make_client, publish_properties

__all__ = [
    "ENV_CONFIG_DIR",
    "Pairing",
    "PairingError",
    "config_dir",
    "find_pairing",
    "identity_for",
    "pair",
    "pairings",
]

_DEFAULT_PAIRING_PORT = 8884


class PairingError(HearthError):
    """Pairing did not happen; ``code`` is the gateway's ErrorCode when it refused."""

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code
        self.message = message


# -- pairing -----------------------------------------------------------------------------------


def pair(
    code: str,
    gateway: GatewayInfo | BrokerAddress | str | None = None,
    *,
    ca_fingerprint: str | None = None,
    device_id: str | None = None,
    interface: str | None = None,
    timeout_s: float = 10.0,
    directory: Path | None = None,
) -> Pairing:
    """Pair with a gateway's pairing listener (``gateway``: "HOST:PORT", a discovered
    GatewayInfo, or None to find the one gateway on the LAN that offers pairing) and store the
    result. Raises PairingError (refused, wrong fingerprint, bad proof) or GatewayUnavailable."""
    try:
        key = pairing_key(code)
    except ValueError as exc:
        raise PairingError(str(exc)) from None
    address, expected = _pairing_address(gateway, interface)
    if not (ca_fingerprint or expected):
        expected = _advertised_fingerprint(address, interface)
    expected = (ca_fingerprint or expected).lower().replace(":", "")
    if not expected:
        raise PairingError(
            "no CA fingerprint to check the gateway against: pass the one "
            "`hearth-gateway pair` printed (--ca-fingerprint)"
        )
    device_id = device_id or os.environ.get(ENV_CLIENT_ID) or default_client_id()

    # 1. The CA, over a connection that proves nothing: only its fingerprint makes it trusted.
    hello = _exchange(address, TlsFiles(None), PairHello(), timeout_s)
    if not isinstance(hello, PairCa):
        raise _unexpected(hello)
    ca_der = _der(hello.ca)
    if not hmac.compare_digest(hashlib.sha256(ca_der).hexdigest(), expected):
        raise PairingError(
            f"the gateway at {address} presented a CA with fingerprint "
            f"{hashlib.sha256(ca_der).hexdigest()}, not {expected}: not pairing"
        )

    root = directory or config_dir()
    final = root / "gateways" / hello.gateway_id
    staging = root / "gateways" / f".{hello.gateway_id}.{uuid.uuid4().hex[:8]}"
    (root / "gateways").mkdir(mode=0o700, parents=True, exist_ok=True)
    staging.mkdir(mode=0o700)
    try:
        _private(staging / "ca.pem", hello.ca.encode())
        # 2. Pinned to that CA from here on: the proof goes to the gateway that owns it.
        key_pem, csr_der = _key_and_csr(device_id)
        _private(staging / "device.key", key_pem)
        request = PairRequest(csr=csr_der, proof=device_proof(key, csr_der))
        result = _exchange(address, TlsFiles(str(staging / "ca.pem")), request, timeout_s)
        if not isinstance(result, PairResult):
            raise _unexpected(result)
        _check_result(result, key, csr_der, ca_der, device_id)
        _private(staging / "device.pem", result.cert.encode())
        pairing = Pairing(
            gateway_id=hello.gateway_id,
            device_id=result.device_id,
            host=address.host,
            port=result.port,
            ca_fingerprint=expected,
            directory=str(final),
            pairing_port=address.port,
        )
        _private(staging / "pairing.json", json.dumps(asdict(pairing), indent=2).encode())
        if final.exists():
            shutil.rmtree(final)  # pairing again replaces the old identity
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return pairing


def _pairing_address(
    gateway: GatewayInfo | BrokerAddress | str | None, interface: str | None
) -> tuple[BrokerAddress, str]:
    """(pairing listener, CA fingerprint advertised or "")."""
    if isinstance(gateway, BrokerAddress):
        return gateway, ""
    if isinstance(gateway, str) and (":" in gateway or _is_ip(gateway)):
        return BrokerAddress.parse(gateway, default_port=_DEFAULT_PAIRING_PORT), ""
    if isinstance(gateway, str):
        # A gateway id: its pairing port and CA fingerprint come from mDNS (the user compares
        # the fingerprint with what `hearth-gateway pair` printed: the CLI shows both).
        found = [g for g in discover(interface=interface, measure=False) if g.pairing_port]
        same = [g for g in found if g.gateway_id == gateway]
        if not same:  # no gateway of that id: a host name after all
            return BrokerAddress.parse(gateway, default_port=_DEFAULT_PAIRING_PORT), ""
        if len(same) > 1:
            prints = ", ".join(g.ca_fingerprint[:16] + "..." for g in same)
            raise PairingError(
                f"found {len(same)} gateways with id {gateway!r} offering pairing over mDNS "
                f"(CA fingerprints {prints}): name one by HOST:PORT"
            )
        gateway = same[0]
    if gateway is None:
        found = [g for g in discover(interface=interface, measure=False) if g.pairing_port]
        if len(found) != 1:
            names = ", ".join(g.gateway_id for g in found) or "none"
            raise PairingError(
                f"found {len(found)} gateways offering pairing ({names}): name one (--gateway)"
            )
        gateway = found[0]
    if not gateway.pairing_port:
        raise PairingError(f"gateway {gateway.gateway_id} does not offer pairing (no TLS)")
    return BrokerAddress(gateway.broker.host, gateway.pairing_port), gateway.ca_fingerprint


def _advertised_fingerprint(address: BrokerAddress, interface: str | None) -> str:
    """The CA fingerprint mDNS advertises for the pairing listener at ``address``, or ""."""
    for g in discover(interface=interface, measure=False):
        if g.pairing_port == address.port and g.broker.host == address.host:
            return g.ca_fingerprint
    return ""


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _exchange(
    address: BrokerAddress, tls: TlsFiles, message: PairHello | PairRequest, timeout_s: float
) -> PairingReply:
    """One request, one reply, on a connection of its own. The listener's ACL ties the topics
    to the MQTT client id, so both are made from it."""
    connection_id = f"pair-{uuid.uuid4().hex[:16]}"
    replies: queue.Queue[bytes] = queue.Queue()
    acks: queue.Queue[Any] = queue.Queue()
    subscribed: queue.Queue[Any] = queue.Queue()
    client = make_client(connection_id, tls=tls)
    client.on_message = lambda _c, _u, msg: replies.put(bytes(msg.payload))
    client.on_publish = lambda _c, _u, _mid, reason, _p: acks.put(reason)
    client.on_subscribe = lambda _c, _u, _mid, reasons, _p: subscribed.put(reasons)

    def on_connected() -> None:
        client.subscribe(pair_reply_topic(connection_id), qos=1)

    try:
        connect(client, address, timeout_s=timeout_s, on_connected=on_connected)
    except GatewayUnavailable as exc:
        raise GatewayUnavailable(f"pairing listener {address}: {exc}") from None
    try:
        _wait(subscribed, timeout_s, "the pairing listener did not confirm our subscription")
        correlation = uuid.uuid4().bytes
        client.publish(
            pair_request_topic(connection_id),
            encode(message),
            qos=1,
            properties=publish_properties(pair_reply_topic(connection_id), correlation),
        )
        reason = _wait(acks, timeout_s, "the pairing listener did not acknowledge our request")
        if reason.is_failure:
            raise PairingError(f"the pairing listener refused our request: {reason}")
        payload = _wait(replies, timeout_s, "no answer from the gateway (is it running?)")
    finally:
        client.disconnect()
        client.loop_stop()
    try:
        return decode_pairing_reply(payload)
    except ProtocolError as exc:
        raise PairingError(f"unreadable answer: {exc}") from None


def _wait(q: queue.Queue[Any], timeout_s: float, what: str) -> Any:
    try:
        return q.get(timeout=timeout_s)
    except queue.Empty:
        raise GatewayUnavailable(what) from None


def _unexpected(reply: PairingReply) -> PairingError:
    if isinstance(reply, Error):
        return PairingError(reply.message, reply.code)
    return PairingError(f"unexpected answer {type(reply).__name__}")


def _der(pem: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise PairingError("the gateway sent something that is no certificate") from None


def _key_and_csr(device_id: str) -> tuple[bytes, bytes]:
    """A new EC P-256 key (PEM, unencrypted: the file is 0600) and its CSR (DER)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.DER)


def _check_result(
    result: PairResult, key: bytes, csr_der: bytes, ca_der: bytes, device_id: str
) -> None:
    """The answer comes from the gateway that knows the code, and the certificate is for our
    key and id, issued by the pinned CA."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    cert_der = _der(result.cert)
    if _der(result.ca) != ca_der:
        raise PairingError("the gateway answered with another CA than the one it presented")
    if not hmac.compare_digest(gateway_proof(key, csr_der, cert_der, ca_der), result.proof):
        raise PairingError("the answer does not prove knowledge of the code: not pairing")
    cert = x509.load_der_x509_certificate(cert_der)
    csr = x509.load_der_x509_csr(csr_der)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    same_key = cert.public_key().public_bytes(serialization.Encoding.DER, spki) == (
        csr.public_key().public_bytes(serialization.Encoding.DER, spki)
    )
    if not same_key or result.device_id != device_id:
        raise PairingError("the certificate is not for this device's key and id")
    ca = x509.load_der_x509_certificate(ca_der)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PairingError("the certificate is not issued by the pinned CA") from None


def _private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
