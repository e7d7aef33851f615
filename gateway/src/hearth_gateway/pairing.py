"""Pairing and the device registry: one-time codes in, client certificates out, revocation.

The owner runs ``hearth-gateway pair``; the daemon (over the control socket) makes a code, keeps
only the key derived from it (hearth.protocol.pairing.pairing_key), in memory, for
``pairing_code_ttl_s``. A device that proves knowledge of a code (an HMAC over its CSR) gets its
CSR signed by the local CA (pki.py); the code is then used up. Every attempt is audited.

Guessing: a code has 60 bits, lives five minutes and is used once. A wrong proof cannot be told
apart from a proof for another code, so each failure counts against every pending code, and a
code is dropped after ``max_failures`` of them; attempts beyond a global rate are refused
unchecked. Together an online attacker gets a handful of guesses per code against 2**60.

Audit: each attempt's row names the pairing connection and where it came from. Requests arrive
as MQTT messages, without an address: ``peer`` (the daemon's BrokerEvents) looks the client id
up in the broker's connection notices, which reach the daemon before the request does.

Revocation (``hearth-gateway devices revoke``) marks the device's certificates revoked, and
``on_change`` (the daemon) regenerates the broker's ACL files and CRL and reloads it: an open
connection of the device can no longer publish or receive, and a new one fails the TLS handshake.
The dispatcher also refuses requests naming a locked-out id (``locked``), whichever way they came.
"""

from __future__ import annotations

import hmac
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hearth.errors import ErrorCode, ProtocolError
from hearth.protocol import Error, encode
from hearth.protocol.pairing import (
    PairCa,
    PairHello,
    PairRequest,
    PairResult,
    decode_pairing_request,
    device_proof,
    format_code,
    gateway_proof,
    new_code,
    pair_reply_topic,
    pair_request_filter,
    pairing_key,
    parse_pair_request_topic,
)
from hearth.transport import BrokerAddress
from hearth_gateway.acl import BrokerSecurity
from hearth_gateway.config import Config
from hearth_gateway.discovery import advertised_addresses
from hearth_gateway.errors import ConfigError
from hearth_gateway.grants import GrantBook, grant_error
from hearth_gateway.loop import Loop
from hearth_gateway.owner import (
    AdminReply,
    AdminRequest,
    CodeIssued,
    CodeRequest,
    DeviceGrant,
    DeviceGrantList,
    DeviceGrantsRequest,
    DeviceInfo,
    DeviceList,
    DeviceListRequest,
    DeviceRevoked,
)
from hearth_gateway.peer_ids import peer_role_refusal
from hearth_gateway.pki import CsrRefused, LocalCA, certificate_ips, fingerprint, key_fingerprint
from hearth_gateway.reply_to import PublishReply, ReplyTo
from hearth_gateway.store import DeviceRecord, Store

__all__ = ["RESERVED_IDS", "PairingService", "pairing_for"]

log = logging.getLogger(__name__)

_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
RESERVED_IDS = frozenset({"admin"})  # the box owner's identity on the control socket
_RATE_PER_MIN = 10  # pairing attempts checked per minute, all connections together
_TOPIC_PREFIX = pair_request_filter().removesuffix("+")
_RELOAD_GRACE_S = 0.3  # the broker reloads its ACLs on SIGHUP within milliseconds; margin


# -- codes -------------------------------------------------------------------------------------


@dataclass
class _Pending:
    key: bytes  # pairing_key(code): the code itself is not kept
    expires_at: float  # monotonic
    failures: int = 0
    peer: bool = False  # pairs a peer gateway (CN peer.ID), not a device


class _Codes:
    def __init__(self, max_failures: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_failures = max_failures
        self._clock = clock
        self._pending: list[_Pending] = []
        self._tokens = float(_RATE_PER_MIN)
        self._refilled_at = clock()

    def issue(self, ttl_s: float, *, peer: bool = False) -> str:
        code = new_code()
        self._pending.append(_Pending(pairing_key(code), self._clock() + ttl_s, peer=peer))
        return code

    def _expire(self) -> None:
        now = self._clock()
        self._pending = [p for p in self._pending if p.expires_at > now]

    def allow(self) -> bool:
        """Token bucket over all attempts: a flood costs nothing but its own refusals."""
        now = self._clock()
        self._tokens = min(
            float(_RATE_PER_MIN), self._tokens + (now - self._refilled_at) * _RATE_PER_MIN / 60
        )
        self._refilled_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def find(self, csr_der: bytes, proof: bytes) -> _Pending | None:
        """The pending code ``proof`` was made with. Every pending code is tried, whatever
        matches first, so the time taken says nothing about which one (or whether) matched."""
        self._expire()
        found: _Pending | None = None
        for pending in self._pending:
            if hmac.compare_digest(device_proof(pending.key, csr_der), proof):
                found = pending
        if found is None:
            for pending in self._pending:
                pending.failures += 1
            dropped = sum(p.failures >= self._max_failures for p in self._pending)
            self._pending = [p for p in self._pending if p.failures < self._max_failures]
            if dropped:
                log.warning(
                    "%d pairing code(s) invalidated after %d failed attempts",
                    dropped,
                    self._max_failures,
                )
        return found

    def use(self, pending: _Pending) -> None:
        self._pending = [p for p in self._pending if p is not pending]

    @property
    def pending(self) -> int:
        self._expire()
        return len(self._pending)


# -- the service -------------------------------------------------------------------------------


class PairingService:
    """Pairing requests (MQTT, on the loop thread) and the owner's registry commands."""

    def __init__(
        self,
        *,
        gateway_id: str,
        ca: LocalCA,
        store: Store,
        loop: Loop,
        publish: PublishReply,
        lan: BrokerAddress,
        pairing: BrokerAddress,
        server_hosts: Iterable[str],
        code_ttl_s: float,
        addresses: Iterable[str] = (),
        max_failures: int,
        on_change: Callable[[], None],
        peer: Callable[[str], str | None] = lambda _client_id: None,
        grants: GrantBook | None = None,
    ) -> None:
        self._gateway_id = gateway_id
        # The owner's topic grants per device (hearth-gateway devices grant): in the LAN ACL.
        self.grants = grants if grants is not None else GrantBook()
        self._peer = peer
        self._ca = ca
        self._store = store
        self._loop = loop
        self._publish = publish
        self.lan = lan
        self.pairing = pairing
        self._device_port = lan.port
        self._pairing_port = pairing.port
        self._addresses = list(addresses)  # the pairing listener's, for the owner's hint
        self._server_hosts = sorted({*server_hosts, lan.host, pairing.host})
        self._ttl_s = code_ttl_s
        self._codes = _Codes(max_failures)
        self._on_change = on_change
        self._rate_limited = 0  # refused unchecked since the last audit entry about it
        self.active: frozenset[str] = frozenset()  # ids with a valid certificate
        self.locked: frozenset[str] = frozenset()  # ids whose every certificate is revoked
        self.revoked_serials: list[tuple[int, float]] = []
        self._refresh()
        self.write_crl()

    def _refresh(self) -> None:
        devices = self._store.devices()
        self.active = frozenset(d.device_id for d in devices if d.revoked_at is None)
        self.locked = frozenset(d.device_id for d in devices) - self.active
        self.revoked_serials = [
            (int(d.serial, 16), d.revoked_at) for d in devices if d.revoked_at is not None
        ]

    @property
    def ca_fingerprint(self) -> str:
        return self._ca.fingerprint

    def named_ips(self) -> set[str] | None:
        """The IP addresses the device listener's certificate names (what may be advertised:
        hearth_gateway.discovery.advertised_addresses); None before it is issued."""
        return certificate_ips(self._ca.server_cert_path)

    @staticmethod
    def owns(topic: str) -> bool:
        """A message for this service (the gateway's link subscribes to pair_request_filter)."""
        return topic.startswith(_TOPIC_PREFIX)

    @property
    def known(self) -> frozenset[str]:
        """Every id that ever had a certificate: local clients may not act as any of them."""
        return self.active | self.locked

    def write_crl(self) -> None:
        self._ca.write_crl(self.revoked_serials)

    def broker_security(self, password: str) -> BrokerSecurity:
        """What the managed broker must enforce now (its TLS files, the ACLs' device ids)."""
        self._ca.ensure_server_cert(self._server_hosts)
        return BrokerSecurity(
            gateway_id=self._gateway_id,
            password=password,
            lan=self.lan,
            pairing=self.pairing,
            ca_file=self._ca.ca_path,
            cert_file=self._ca.server_cert_path,
            key_file=self._ca.server_key_path,
            crl_file=self._ca.crl_path,
            devices=self.active,
            known=self.known,
            grants=self.grants.acl_entries(),
        )

    # -- MQTT ------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, reply_to: ReplyTo) -> None:
        connection = parse_pair_request_topic(topic)
        if connection is None or reply_to.topic != pair_reply_topic(connection):
            return  # the listener's ACL makes this unreachable; nowhere safe to answer anyway
        # The pairing connection's client id is "pair-" + random: the address says who.
        actor = f"pairing:{connection} from {self._peer(connection) or 'an unknown address'}"

        def reply(message: msgspec.Struct) -> None:
            self._publish(reply_to, encode(message))

        try:
            request = decode_pairing_request(payload)
        except ProtocolError as exc:
            reply(Error(code=exc.code, message=exc.message))
            return
        if isinstance(request, PairHello):
            ca = self._ca.ca_pem.decode()
            reply(PairCa(gateway_id=self._gateway_id, ca=ca, port=self._device_port))
            return
        if not self._codes.allow():
            self._rate_limited += 1
            if self._rate_limited == 1 or self._rate_limited % 100 == 0:
                self._store.audit(
                    actor, "pair", "", "refused", f"rate limited ({self._rate_limited} so far)"
                )
            reply(Error(code=ErrorCode.OVERLOADED, message="too many pairing attempts; wait"))
            return
        self._rate_limited = 0
        outcome = self._pair(actor, request)
        if isinstance(outcome, Error):
            reply(outcome)
            return
        # The device connects to the device listener as soon as it has this: let the broker
        # finish reloading the ACLs that now name it first.
        self._loop.call_later(_RELOAD_GRACE_S, lambda: reply(outcome))

    def _pair(self, actor: str, request: PairRequest) -> PairResult | Error:
        pending = self._codes.find(request.csr, request.proof)
        if pending is None:
            self._store.audit(actor, "pair", "", "refused", "wrong, used or expired code")
            return Error(
                code=ErrorCode.FORBIDDEN, message="the pairing code is wrong, used or expired"
            )
        try:
            device_id, key_fp = _requested(request.csr)
        except CsrRefused as exc:
            self._store.audit(actor, "pair", "", "refused", str(exc))
            return Error(code=ErrorCode.MALFORMED, message=str(exc))
        why = self._id_refusal(device_id, key_fp) or peer_role_refusal(device_id, peer=pending.peer)
        if why is not None:
            self._store.audit(actor, "pair", device_id, "refused", why)
            return Error(code=ErrorCode.FORBIDDEN, message=why)
        try:
            cert = self._ca.sign_device(request.csr, device_id, peer=pending.peer)
        except CsrRefused as exc:
            self._store.audit(actor, "pair", device_id, "refused", str(exc))
            return Error(code=ErrorCode.MALFORMED, message=str(exc))
        self._codes.use(pending)
        record = DeviceRecord(
            serial=format(cert.serial_number, "x"),
            device_id=device_id,
            fingerprint=fingerprint(cert),
            key_fingerprint=key_fp,
            paired_at=time.time(),
        )
        self._store.add_device(record, supersede=device_id in self.active)
        kind = "peer gateway" if pending.peer else "device"
        self._store.audit(
            actor, "pair", device_id, "allowed", f"{kind} certificate {record.serial}"
        )
        log.info("paired %s %s (certificate %s)", kind, device_id, record.serial)
        self._refresh()
        self.write_crl()  # a superseded certificate is revoked too
        self._on_change()
        cert_der = cert.public_bytes(serialization.Encoding.DER)
        ca_der = self._ca.cert.public_bytes(serialization.Encoding.DER)
        return PairResult(
            device_id=device_id,
            cert=cert.public_bytes(serialization.Encoding.PEM).decode(),
            ca=self._ca.ca_pem.decode(),
            port=self._device_port,
            proof=gateway_proof(pending.key, request.csr, cert_der, ca_der),
        )

    def _id_refusal(self, device_id: str, key_fp: str) -> str | None:
        if not _DEVICE_ID_RE.match(device_id):
            return f"device id {device_id!r} is not 1-64 of [A-Za-z0-9_.-]"
        if device_id in RESERVED_IDS:
            return f"device id {device_id!r} is reserved"
        if device_id in self.active:
            keys = {
                d.key_fingerprint
                for d in self._store.devices()
                if d.device_id == device_id and d.revoked_at is None
            }
            if keys != {key_fp}:
                return (
                    f"device id {device_id!r} is paired with another key; "
                    "revoke it first (hearth-gateway devices revoke)"
                )
        return None

    # -- the owner's commands --------------------------------------------------------------

    def admin(self, request: AdminRequest) -> AdminReply:
        if isinstance(request, CodeRequest):
            ttl_s = self._ttl_s if request.ttl_s is None else request.ttl_s
            if not 0 < ttl_s <= 3600:
                return Error(code=ErrorCode.BAD_PARAMS, message="ttl_s must be in (0, 3600]")
            code = self._codes.issue(ttl_s, peer=request.peer)
            kind = "peer code" if request.peer else "code"
            self._store.audit("admin", "pair_code", "", "allowed", f"{kind} valid {ttl_s:.0f} s")
            return CodeIssued(
                code=format_code(code),
                expires_at=time.time() + ttl_s,
                gateway_id=self._gateway_id,
                ca_fingerprint=self._ca.fingerprint,
                pairing_port=self._pairing_port,
                addresses=self._addresses,
                peer=request.peer,
            )
        if isinstance(request, DeviceListRequest):
            return DeviceList(
                devices=[
                    DeviceInfo(
                        device_id=d.device_id,
                        serial=d.serial,
                        fingerprint=d.fingerprint,
                        paired_at=d.paired_at,
                        revoked_at=d.revoked_at,
                        reason=d.reason,
                    )
                    for d in self._store.devices()
                ]
            )
        if isinstance(request, DeviceGrant | DeviceGrantsRequest):
            return self._grant(request)
        return self.revoke(request.device_id)

    def _grant(self, request: DeviceGrant | DeviceGrantsRequest) -> DeviceGrantList | Error:
        """The owner's topic grants for a paired device (grants.py), in force at once."""
        if isinstance(request, DeviceGrant):
            for topic_filter in (*request.publish, *request.subscribe):
                if why := grant_error(topic_filter):
                    message = f"{topic_filter!r}: {why}"
                    self._store.audit(
                        "admin", "device_grant", request.device_id, "refused", message
                    )
                    return Error(code=ErrorCode.BAD_PARAMS, message=message)
            if not request.revoke and request.device_id not in self.active:
                message = f"{request.device_id}: no such paired device"
                self._store.audit("admin", "device_grant", request.device_id, "refused", message)
                return Error(code=ErrorCode.BAD_PARAMS, message=message)
            change = self.grants.remove if request.revoke else self.grants.add
            change(request.device_id, request.publish, request.subscribe)
            self._on_change()
            what = f"publish {request.publish} subscribe {request.subscribe}"
            action = "device_ungrant" if request.revoke else "device_grant"
            self._store.audit("admin", action, request.device_id, "allowed", what)
            log.info("%s %s: %s", action, request.device_id, what)
        return DeviceGrantList(
            grants=[(d, list(p), list(s)) for d, p, s in self.grants.acl_entries()]
        )

    def revoke(self, device_id: str) -> DeviceRevoked | Error:
        serials = self._store.revoke_device(device_id, "revoked by the owner")
        if not serials:
            known = device_id in self.locked
            why = "already revoked" if known else "no such device"
            self._store.audit("admin", "device_revoke", device_id, "refused", why)
            told = "already revoked" if known else "no such paired device"
            return Error(code=ErrorCode.BAD_PARAMS, message=f"{device_id}: {told}")
        self._refresh()
        self.write_crl()
        self._on_change()
        self._store.audit(
            "admin", "device_revoke", device_id, "allowed", f"certificates {', '.join(serials)}"
        )
        log.info("revoked device %s (certificates %s)", device_id, ", ".join(serials))
        return DeviceRevoked(device_id=device_id, serials=serials)


def pairing_for(
    config: Config,
    *,
    gateway_id: str,
    state_dir: Path,
    store: Store,
    loop: Loop,
    publish: PublishReply,
    on_change: Callable[[], None],
    peer: Callable[[str], str | None] = lambda _client_id: None,
) -> PairingService | None:
    """The pairing service the configuration asks for: None without ``lan_listen``."""
    if not config.lan_listen:
        if config.pairing_listen:
            raise ConfigError("pairing_listen needs lan_listen (where paired devices connect)")
        return None
    if config.broker:
        raise ConfigError("lan_listen needs the managed broker: its ACLs are the gateway's")
    try:
        lan = BrokerAddress.parse(config.lan_listen, default_port=8883)
        pairing = (
            BrokerAddress.parse(config.pairing_listen, default_port=8884)
            if config.pairing_listen
            else BrokerAddress(lan.host, lan.port + 1)
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    ports = [BrokerAddress.parse(config.listen).port, lan.port, pairing.port]
    if len(set(ports)) != len(ports):
        raise ConfigError(f"listen, lan_listen and pairing_listen need three ports, not {ports}")
    # Every name a device may use to reach the listeners: the certificate must match it.
    hosts = {
        "localhost",
        "127.0.0.1",
        "::1",
        socket.gethostname(),
        f"{gateway_id}.local",
        *advertised_addresses(lan, config.mdns_interface or None),
    }
    return PairingService(
        gateway_id=gateway_id,
        ca=LocalCA(state_dir / "pki", gateway_id),
        store=store,
        loop=loop,
        publish=publish,
        lan=lan,
        pairing=pairing,
        server_hosts=hosts,
        code_ttl_s=config.pairing_code_ttl_s,
        addresses=advertised_addresses(pairing, config.mdns_interface or None),
        max_failures=config.pairing_max_failures,
        on_change=on_change,
        peer=peer,
        grants=GrantBook.load(state_dir),
    )


def _requested(csr_der: bytes) -> tuple[str, str]:
    """(device id asked for: the CSR's CN, fingerprint of its key)."""
    try:
        csr = x509.load_der_x509_csr(csr_der)
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        key = csr.public_key()
    except ValueError:
        raise CsrRefused("not a DER certificate signing request") from None
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise CsrRefused("the CSR's subject must have exactly one CN: the device id")
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CsrRefused("the CSR's key must be EC P-256 or P-384")
    return names[0].value, key_fingerprint(key)
