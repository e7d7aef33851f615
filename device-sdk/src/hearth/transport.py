"""MQTT 5 plumbing shared by the SDK and the gateway: one way to build a paho client (MQTT 5,
TCP_NODELAY), to connect with a deadline, to attach request/response properties, and to decode
the PUBLISH packets it receives faster than paho does (``fast_publish_decoding``: in the daemon
and in the SDK's connection, paho's generic decoding was the largest share of the time spent
per message).

TCP_NODELAY matters: small QoS 1 messages on loopback otherwise stall for tens of milliseconds
between Nagle's algorithm and delayed ACKs.

TLS (a gateway's device listener, docs/security.md): only the gateway's own CA is trusted, the
one pinned at pairing, and the server certificate must name the host dialled.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hearth.errors import GatewayUnavailable
from hearth.protocol.codec import CONTENT_TYPE

__all__ = [
    "BrokerAddress",
    "PublishProperties",
    "TlsFiles",
    "connect",
    "fast_publish_decoding",
    "make_client",
    "properties",
    "publish_properties",
    "reply_properties",
    "set_nodelay",
]

log = logging.getLogger(__name__)


class BrokerAddress:
    """host:port of an MQTT broker, parsed once. IPv6 literals go in brackets: [::1]:1883."""

    __slots__ = ("host", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    @classmethod
    def parse(cls, text: str, default_port: int = 1883) -> BrokerAddress:
        text = text.strip()
        for scheme in ("mqtt://", "tcp://"):
            if text.startswith(scheme):
                text = text[len(scheme) :]
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port_text = rest.removeprefix(":")
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        else:
            host, port_text = text, ""
        if not host:
            raise ValueError(f"no host in broker address {text!r}")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ValueError(f"bad port in broker address {text!r}") from None
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in broker address {text!r}")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"BrokerAddress({self.host!r}, {self.port})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BrokerAddress) and (self.host, self.port) == (
            other.host,
            other.port,
        )

    def __hash__(self) -> int:
        return hash((self.host, self.port))


@dataclass(frozen=True)
class TlsFiles:
    """TLS to a gateway. ``ca_file`` is the only CA trusted; None means no verification at
    all, which only pairing's first step uses, to fetch the CA whose fingerprint it checks."""

    ca_file: str | None
    cert_file: str | None = None  # this device's certificate (PEM), for mutual TLS
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        if self.ca_file is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            # cafile given: that CA alone, not the system's; hostname checked, CERT_REQUIRED.
            context = ssl.create_default_context(cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


def properties(packet_type: int, *, content_type: bool = False) -> Properties:
    """MQTT 5 properties for one packet type (paho's constructor is untyped: wrapped once)."""
    props = Properties(packet_type)  # type: ignore[no-untyped-call]
    if content_type:
        props.ContentType = CONTENT_TYPE
    return props


def set_nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """paho ``on_socket_open`` hook: disable Nagle on the broker connection."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(
    client_id: str,
    *,
    will: tuple[str, bytes] | None = None,
    max_inflight: int = 64,
    tls: TlsFiles | None = None,
) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if tls is not None:
        client.tls_set_context(tls.context())
    client.on_socket_open = set_nodelay
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(0)
    if will is not None:
        topic, payload = will
        props = properties(PacketTypes.WILLMESSAGE, content_type=True)
        client.will_set(topic, payload, qos=1, retain=True, properties=props)
    return client


def connect(
    client: mqtt.Client,
    address: BrokerAddress,
    *,
    timeout_s: float = 5.0,
    keepalive_s: int = 15,
    clean_start: bool = True,
    session_expiry_s: int = 0,
    on_connected: Callable[[], None] | None = None,
) -> None:
    """Connect and start paho's network thread; returns once the broker accepted us.

    ``on_connected`` runs on every (re)connect, from paho's thread: subscribe there so a broker
    restart does not leave us deaf.
    """
    accepted = threading.Event()
    refused: list[str] = []

    def on_connect(_c: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
            accepted.set()
            return
        if on_connected is not None:
            on_connected()
        accepted.set()

    previous_on_disconnect: Any = client.on_disconnect  # paho types it as any API version's

    def on_disconnect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        # Closed before any CONNACK: a TLS listener that refused our certificate (or none),
        # plain MQTT sent to a TLS port. Say so now rather than after the whole timeout.
        if not accepted.is_set():
            refused.append(f"the connection closed before CONNACK ({reason})")
            accepted.set()
        if previous_on_disconnect is not None:
            previous_on_disconnect(c, u, flags, reason, props)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    props = properties(PacketTypes.CONNECT)
    if session_expiry_s:
        props.SessionExpiryInterval = session_expiry_s
    try:
        client.connect(
            address.host,
            address.port,
            keepalive=keepalive_s,
            clean_start=clean_start,
            properties=props,
        )
    except OSError as exc:
        # The cause stays attached: a failed certificate check is worth explaining (the SDK
        # compares the gateway's CA with the one it pinned at pairing).
        raise GatewayUnavailable(f"cannot reach broker {address}: {exc}") from exc
    client.loop_start()
    if not accepted.wait(timeout_s) or refused:
        client.loop_stop()
        client.disconnect()
        why = refused[0] if refused else f"no CONNACK within {timeout_s} s"
        raise GatewayUnavailable(f"broker {address} refused us: {why}")
    client.on_disconnect = previous_on_disconnect


# MQTT 5 property identifiers (MQTT 5.0, section 2.2.2.2) of the PUBLISH properties we send.
_CONTENT_TYPE_ID = 0x03
_RESPONSE_TOPIC_ID = 0x08
_CORRELATION_DATA_ID = 0x09


class PackedProperties(Properties):
    """PUBLISH properties packed once, by hand. paho's generic ``Properties`` looks each name up
    in its tables on every attribute set and again when packing, about 0.1 ms per message in
    Python: on the request/response path that is a large share of the cost of a small job.
    paho only ever calls ``pack()`` on the properties of a publish (also when it resends one)."""

    def __init__(self, packed: bytes) -> None:  # no super().__init__: nothing of it is used
        object.__setattr__(self, "_packed", packed)
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)

    def pack(self) -> bytes:
        packed: bytes = object.__getattribute__(self, "_packed")
        return packed


def _utf8(identifier: int, text: str) -> bytes:
    data = text.encode()
    return bytes((identifier,)) + len(data).to_bytes(2, "big") + data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_PACKED_CONTENT_TYPE = _utf8(_CONTENT_TYPE_ID, CONTENT_TYPE)


def reply_properties(correlation: bytes | None) -> Properties:
    """A reply's properties: the protocol's Content Type and the request's Correlation Data."""
    body = _PACKED_CONTENT_TYPE
    if correlation is not None:
        body += bytes((_CORRELATION_DATA_ID,)) + len(correlation).to_bytes(2, "big") + correlation
    return PackedProperties(_varint(len(body)) + body)


def publish_properties(response_topic: str, correlation: bytes) -> Properties:
    """A request's properties: Content Type, where to answer, and the Correlation Data."""
    body = (
        _PACKED_CONTENT_TYPE
        + _utf8(_RESPONSE_TOPIC_ID, response_topic)
        + bytes((_CORRELATION_DATA_ID,))
        + len(correlation).to_bytes(2, "big")
        + correlation
    )
    return PackedProperties(_varint(len(body)) + body)


# MQTT 5 PUBLISH properties (id: how its value is encoded), the only ones a PUBLISH may carry.
_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PUBLISH_PROPERTIES = {
    0x01: _BYTE,  # Payload Format Indicator
    0x02: _U32,  # Message Expiry Interval
    0x03: _UTF8,  # Content Type
    0x08: _UTF8,  # Response Topic
    0x09: _BINARY,  # Correlation Data
    0x0B: _VARINT,  # Subscription Identifier
    0x23: _U16,  # Topic Alias
    0x26: _PAIR,  # User Property
}


class PublishProperties:
    """What the gateway reads of a request's properties, decoded without paho's generic
    Properties (a third of the daemon's time per request went there)."""

    __slots__ = ("ContentType", "CorrelationData", "ResponseTopic")

    def __init__(self) -> None:
        self.ResponseTopic: str | None = None
        self.CorrelationData: bytes | None = None
        self.ContentType: str | None = None


class _Malformed(Exception):
    """Something this decoder does not take: paho's own decoder gets the packet."""


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(4):
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Malformed


def _properties(view: memoryview, pos: int, end: int) -> PublishProperties:
    props = PublishProperties()
    while pos < end:
        ident = view[pos]
        kind = _PUBLISH_PROPERTIES.get(ident)
        pos += 1
        if kind is None:
            raise _Malformed
        if kind == _BYTE:
            pos += 1
        elif kind == _U16:
            pos += 2
        elif kind == _U32:
            pos += 4
        elif kind == _VARINT:
            pos = _read_varint(view, pos)[1]
        else:
            for _ in range(2 if kind == _PAIR else 1):
                size = int.from_bytes(view[pos : pos + 2])
                value = view[pos + 2 : pos + 2 + size]
                pos += 2 + size
            if ident == 0x08:
                props.ResponseTopic = str(value, "utf-8")
            elif ident == 0x09:
                props.CorrelationData = bytes(value)
            elif ident == 0x03:
                props.ContentType = str(value, "utf-8")
    if pos != end:
        raise _Malformed
    return props


def _deliver(client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
    """paho's _handle_on_message, without its per-message topic-filter lookup when no filtered
    callback is registered (none of ours is): that lookup builds a recursive closure, a
    reference cycle per message, garbage only the cyclic collector frees."""
    if client._on_message_filtered._root._children:  # message_callback_add was used
        client._handle_on_message(message)
        return
    on_message = client.on_message
    if on_message is None:
        return
    with client._in_callback_mutex:  # publishes from the callback are queued, as paho does
        try:
            on_message(client, client._userdata, message)
        except Exception as err:
            client._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
            if not client.suppress_exceptions:
                raise


def fast_publish_decoding(client: mqtt.Client) -> None:
    """Decode the PUBLISH packets ``client`` receives (QoS 0 and 1) without paho's generic
    MQTT 5 properties and without copying the payload more than once; ``msg.properties`` is
    then a PublishProperties. Anything else (QoS 2, a property we do not know, a malformed
    packet) goes to paho's own decoder, which says what is wrong with it."""
    original: Callable[[], MQTTErrorCode] = client._handle_publish

    def handle_publish() -> MQTTErrorCode:
        header = client._in_packet["command"]
        qos = (header & 0x06) >> 1
        if qos > 1:
            return original()
        view = memoryview(client._in_packet["packet"])
        try:
            size = int.from_bytes(view[0:2])
            topic = bytes(view[2 : 2 + size])
            pos = 2 + size
            mid = 0
            if qos:
                mid = int.from_bytes(view[pos : pos + 2])
                pos += 2
            length, pos = _read_varint(view, pos)
            props = _properties(view, pos, pos + length)
            payload = bytes(view[pos + length :])
            topic.decode()  # an invalid topic: paho's decoder reports it
        except (_Malformed, IndexError, UnicodeDecodeError):
            return original()
        message = mqtt.MQTTMessage(mid=mid, topic=topic)
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.properties = props  # type: ignore[assignment]
        message.payload = payload
        message.timestamp = time.monotonic()
        _deliver(client, message)
        if qos and not client._manual_ack:
            return client._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    client._handle_publish = handle_publish  # type: ignore[method-assign]
