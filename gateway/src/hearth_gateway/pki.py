"""The gateway's own certificate authority: no cloud, no public CA, nothing to renew by hand.

Everything lives in ``state/pki/`` (directory 0700, keys 0600)::

    ca.key, ca.pem          EC P-256, self-signed, ~10 years; devices pin its fingerprint
    server.key, server.pem  the broker's TLS listeners (server.pem: server cert, then the CA)
    crl.pem                 serials of revoked device certificates

Device certificates (EC, ~2 years, CN = the device id) are signed from CSRs the pairing service
has checked (pairing.py). The CA fingerprint is the SHA-256 of the CA certificate's DER, in hex:
it is what ``hearth-gateway pair`` prints and the mDNS TXT record ``ca=`` carries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hearth_gateway.errors import GatewayError

__all__ = [
    "PEER_USAGE",
    "CsrRefused",
    "LocalCA",
    "certificate_ips",
    "fingerprint",
    "is_peer_cert",
    "key_fingerprint",
]

log = logging.getLogger(__name__)

_CA_DAYS = 3650
_SERVER_DAYS = 825  # the longest lifetime TLS clients commonly accept for a server certificate
_DEVICE_DAYS = 730
_RENEW_BEFORE = dt.timedelta(days=30)  # reissue the server certificate this long before expiry
_CLOCK_SKEW = dt.timedelta(minutes=5)  # not_before in the past: devices with a slightly slow clock
_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)
# The extended key usage that marks a peer gateway's client certificate (docs/peers.md): an OID
# under 2.25 (a UUID as an integer, ITU-T X.667), so it needs no registered arc.
PEER_USAGE = x509.ObjectIdentifier("2.25.96132155405931587946017286154066432137")


class CsrRefused(GatewayError):
    """A certificate signing request the CA will not sign; the message says why."""


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the SubjectPublicKeyInfo: the same key gives the same value in any cert."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically, so that a broker reloading on SIGHUP never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class LocalCA:
    """The CA of one gateway, loaded from (or created in) ``directory``."""

    def __init__(self, directory: Path, gateway_id: str) -> None:
        self.directory = directory
        self.gateway_id = gateway_id
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        if self.ca_path.exists() and self._ca_key_path.exists():
            self.cert = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
            key = serialization.load_pem_private_key(self._ca_key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise GatewayError(f"{self._ca_key_path}: not an EC private key")
            self._key = key
        else:
            self._key, self.cert = self._create_ca()
        self.fingerprint = fingerprint(self.cert)

    # -- files ------------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def _ca_key_path(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert_path(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.directory / "server.key"

    @property
    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def ca_pem(self) -> bytes:
        return _pem(self.cert)

    # -- the CA -----------------------------------------------------------------------------

    def _create_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hearth"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Hearth gateway {self.gateway_id} CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
            # Signs device and server certificates only: no intermediate CA below it.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        # Key first: a crash in between leaves no certificate without its key.
        _write(self._ca_key_path, _key_pem(key))
        _write(self.ca_path, _pem(cert), 0o644)
        log.info("created the gateway CA, fingerprint %s", fingerprint(cert))
        return key, cert

    def _issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        days: int,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName] | None = None,
        *,
        extra_usage: tuple[x509.ObjectIdentifier, ...] = (),
    ) -> x509.Certificate:
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage, *extra_usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self._key, hashes.SHA256())

    # -- the broker's server certificate ----------------------------------------------------

    def ensure_server_cert(self, hosts: Iterable[str]) -> None:
        """A server certificate naming every one of ``hosts`` (names or IP literals), reissued
        when one is missing, when it nears expiry, or when the CA changed. Devices pin the CA,
        not this certificate, so reissuing it is invisible to them."""
        wanted = _general_names(hosts)
        if self._server_cert_ok(wanted):
            return
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(
            key.public_key(), self.gateway_id, _SERVER_DAYS, ExtendedKeyUsageOID.SERVER_AUTH,
            sorted(wanted, key=str),
        )  # fmt: skip
        _write(self.server_key_path, _key_pem(key))
        # The chain a device sees: the server certificate, then the CA it pinned.
        _write(self.server_cert_path, _pem(cert) + self.ca_pem, 0o644)
        log.info("issued the broker's server certificate for %s",
                 ", ".join(sorted(_name_text(n) for n in wanted)))  # fmt: skip

    def _server_cert_ok(self, wanted: set[x509.GeneralName]) -> bool:
        if not (self.server_cert_path.exists() and self.server_key_path.exists()):
            return False
        try:
            cert = x509.load_pem_x509_certificate(self.server_cert_path.read_bytes())
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            return False
        return (
            cert.issuer == self.cert.subject
            and cert.not_valid_after_utc - _now() > _RENEW_BEFORE
            and wanted <= set(sans)
        )

    # -- devices ----------------------------------------------------------------------------

    def sign_device(
        self, csr_der: bytes, device_id: str, *, peer: bool = False
    ) -> x509.Certificate:
        """A client certificate with CN = ``device_id`` for the key in ``csr_der``. Only the
        CSR's key is used: its subject and extensions are the device's wish, not ours.
        ``peer``: a peer gateway's, marked with ``PEER_USAGE`` (paired with a peer code)."""
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError:
            raise CsrRefused("not a DER certificate signing request") from None
        if not csr.is_signature_valid:
            raise CsrRefused("the CSR's signature does not verify")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, _ACCEPTED_CURVES
        ):
            raise CsrRefused("the CSR's key must be EC P-256 or P-384")
        extra = (PEER_USAGE,) if peer else ()
        return self._issue(
            key, device_id, _DEVICE_DAYS, ExtendedKeyUsageOID.CLIENT_AUTH, extra_usage=extra
        )

    def write_crl(self, revoked: Iterable[tuple[int, float]]) -> None:
        """The CRL of the given (serial, revoked at unix seconds). Its next update is the CA's
        own expiry: OpenSSL fails every client once a CRL is past its next update, and this
        one is rewritten whenever something is revoked."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - _CLOCK_SKEW)
            .next_update(self.cert.not_valid_after_utc)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        )
        for serial, at in sorted(revoked):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(dt.datetime.fromtimestamp(at, dt.UTC))
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        _write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)


def is_peer_cert(cert: x509.Certificate) -> bool:
    """Whether a client certificate carries the peer marker (``PEER_USAGE``)."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return PEER_USAGE in list(usages)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf (EC key) only signs its TLS handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _general_names(hosts: Iterable[str]) -> set[x509.GeneralName]:
    names: set[x509.GeneralName] = set()
    for host in hosts:
        if not host or host in ("0.0.0.0", "::"):
            continue
        try:
            names.add(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.add(x509.DNSName(host.lower()))
    return names


def _name_text(name: x509.GeneralName) -> str:
    return str(name.value)


def certificate_ips(path: Path) -> set[str] | None:
    """The IP addresses a certificate file's SubjectAlternativeName lists; None when there is no
    readable certificate (then nothing restricts what is advertised)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None
    return {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
