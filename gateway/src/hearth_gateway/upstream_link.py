"""The home gateway's MQTT 5 connection to its upstream gateway's broker, where it acts as an
ordinary device (client id ``gw-{gateway id}``).

A direct connection rather than a Mosquitto bridge: a bridge forwards whatever matches its topic
patterns, with the broker's own code deciding, while here every message is built by this
process and ``send`` is the only way out. ``send`` passes the exact bytes about to leave to
``placement.egress_refusal`` and refuses (and audits) anything it does not allow: a job labelled
private cannot be published upstream whatever the caller did. There is no Last Will (a message
the broker would publish for us, past that check) and no other publish.

paho runs without its own thread, driven by the daemon's loop as in link.py. Before each
connect a non-blocking TCP probe checks that the upstream answers at all, so an unreachable
upstream (the Internet is down) never blocks the loop that serves the LAN in paho's connect.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes

from hearth.errors import HearthError
from hearth.protocol import (
    DataClass,
    GatewayStatus,
    Request,
    decode_status,
    encode,
    reply_topic,
    request_topic,
)
from hearth.transport import BrokerAddress, make_client, properties, publish_properties
from hearth_gateway._paho_io import LoopDriven
from hearth_gateway.errors import ConfigError, GatewayError
from hearth_gateway.loop import Loop, Timer
from hearth_gateway.placement import connection_refusal, egress_refusal
from hearth_gateway.policy import PlacementPolicy

__all__ = ["EgressRefused", "UpstreamLink", "UpstreamTarget", "UpstreamUnavailable"]

log = logging.getLogger(__name__)

_KEEPALIVE_S = 15
_PROBE_TIMEOUT_S = 5.0
_RECONNECT_MAX_S = 30.0

# Store.audit: actor, action, target, verdict ("allowed" | "refused"), reason
Audit = Callable[[str, str, str, str, str], None]
# placement.egress_refusal's signature: (topic, payload, upstream_id=, client_id=, blobs=)
Egress = Callable[..., str | None]


class EgressRefused(GatewayError):
    """A message was about to leave for the upstream and the egress check refused it."""


class UpstreamUnavailable(GatewayError):
    """The upstream is not connected (or its gateway is not online) right now."""


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """``upstream = "mqtt://host:port"`` (plain) or ``"mqtts://host:port"`` (TLS), with the TLS
    files: the CA to trust (default: the system's) and a client certificate and key when the
    upstream's broker wants one. ``gateway_id``: the upstream gateway; empty: the one whose
    retained status is online there."""

    address: BrokerAddress
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    gateway_id: str = ""

    @classmethod
    def parse(cls, url: str, **tls_files: str) -> UpstreamTarget:
        text = url.strip()
        tls = text.startswith("mqtts://")
        try:
            address = BrokerAddress.parse(
                text.removeprefix("mqtts://"), default_port=8883 if tls else 1883
            )
        except ValueError as exc:
            raise ConfigError(f"upstream: {exc}") from None
        # gateway_id travels with the TLS files but is no TLS setting.
        if any(v for k, v in tls_files.items() if k != "gateway_id") and not tls:
            raise ConfigError("upstream TLS files given for a plain mqtt:// upstream")
        return cls(address, tls, **tls_files)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.address}"


class UpstreamLink(LoopDriven):
    def __init__(
        self,
        loop: Loop,
        target: UpstreamTarget,
        gateway_id: str,
        *,
        policy: PlacementPolicy,
        audit: Audit,
        # The blobs public jobs in flight name, with the label recorded for each here.
        cleared_blobs: Callable[[], Mapping[str, DataClass]],
        on_reply: Callable[[bytes, bytes], None],  # correlation, payload
        on_refused: Callable[[bytes, str], None],  # correlation, why (a PUBACK failure)
        on_lost: Callable[[], None],  # nothing in flight will be answered
        # A pool member's Last Will (docs/protocol.md §19): its jobs go to the pool again.
        on_member_lost: Callable[[str], None] = lambda _member: None,
        # A LAN peer (peers.py) reuses this link: its own client id, egress check and status.
        client_id: str = "",
        egress: Egress = egress_refusal,
        on_status: Callable[[GatewayStatus], None] | None = None,
        what: str = "public jobs only",
    ) -> None:
        self.loop = loop
        self.target = target
        # Our {client} at the upstream; ids are at most 64 characters.
        self.client_id = client_id or f"gw-{gateway_id}"[:64]
        self._egress = egress
        self._on_status = on_status
        self._what = what
        self._gateway_id = gateway_id
        self._policy = policy
        self._audit = audit
        self._cleared_blobs = cleared_blobs
        self._on_reply = on_reply
        self._on_refused = on_refused
        self._on_lost = on_lost
        self._on_member_lost = on_member_lost
        # Members of the upstream's pool that took a job or asked for a blob: their own
        # request topics are allowed too (egress check).
        self.members: set[str] = set()
        self._reply_topic = reply_topic(self.client_id)
        self._client = make_client(self.client_id)  # no will: see connection_refusal
        if target.tls:
            self._client.tls_set(
                ca_certs=target.ca_file or None,
                certfile=target.cert_file or None,
                keyfile=target.key_file or None,
            )
        self._client.on_connect = self._connected
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._message
        self._client.on_publish = self._published
        self._client.on_subscribe = self._subscribed
        self._mids: dict[int, bytes] = {}  # QoS 1 publishes awaiting their PUBACK
        self._probe_sock: socket.socket | None = None
        self._probe_timer: Timer | None = None
        self._backoff_s = 0.5
        self._closed = False
        self.connected = False
        self.upstream_id = target.gateway_id  # learned from the retained status if not set
        self.upstream_online = False

    @property
    def ready(self) -> bool:
        return self.connected and self.upstream_online and bool(self.upstream_id)

    # -- sending: the only way out ----------------------------------------------------------

    def send(self, message: Request, correlation: bytes, to: str = "") -> None:
        """Publish one request to the upstream gateway (QoS 1), or to ``to``, a member of its
        pool, after the egress check. Raises EgressRefused (audited) or UpstreamUnavailable."""
        payload = encode(message)
        gateway = to or self.upstream_id
        topic = request_topic(gateway, self.client_id) if gateway else ""
        why = self._egress(
            topic,
            payload,
            upstream_id=self.upstream_id,
            client_id=self.client_id,
            blobs=self._cleared_blobs(),
            members=self.members,
        )
        if why is not None:
            self._audit(self._gateway_id, "egress", topic or str(self.target), "refused", why)
            log.error("egress check refused a message for the upstream: %s", why)
            raise EgressRefused(why)
        if not self.ready:
            raise UpstreamUnavailable(f"upstream {self.target} is not available")
        info = self._client.publish(
            topic, payload, qos=1, properties=publish_properties(self._reply_topic, correlation)
        )
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise UpstreamUnavailable(f"publishing to {self.target} failed ({info.rc})")
        self._mids[info.mid] = correlation
        self._flush()

    # -- connection ---------------------------------------------------------------------------

    def start(self) -> bool:
        """Begin connecting (in the background: the loop is never blocked on the upstream).
        False if the connection check refuses any upstream connection."""
        why = connection_refusal(tier="home", policy=self._policy, will=None)
        if why is not None:
            self._audit(self._gateway_id, "egress:connect", str(self.target), "refused", why)
            log.warning("no upstream connection: %s", why)
            return False
        self.loop.every(1.0, self._misc)
        self._probe()
        return True

    def _probe(self) -> None:
        if self._closed:
            return
        address = self.target.address
        try:
            # Resolving a name blocks; an address (the usual configuration) does not.
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            self._retry(f"cannot resolve {address}: {exc}")
            return
        sock.setblocking(False)
        rc = sock.connect_ex(sockaddr)
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            self._retry(f"cannot reach {address}: {errno.errorcode.get(rc, rc)}")
            return
        self._probe_sock = sock
        self.loop.add_writer(sock.fileno(), self._probed)
        self._probe_timer = self.loop.call_later(_PROBE_TIMEOUT_S, self._probed)

    def _probed(self) -> None:
        sock, self._probe_sock = self._probe_sock, None
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        if sock is None:
            return
        self.loop.remove_writer(sock.fileno())
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        try:
            sock.getpeername()
        except OSError:
            error = error or errno.ETIMEDOUT
        sock.close()
        if error:
            self._retry(f"cannot reach {self.target.address}: {errno.errorcode.get(error, error)}")
            return
        self._open()

    def _open(self) -> None:
        props = properties(PacketTypes.CONNECT)
        try:
            self._client.connect(
                self.target.address.host,
                self.target.address.port,
                keepalive=_KEEPALIVE_S,
                clean_start=True,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            self._retry(f"connecting to {self.target} failed: {exc}")
            return
        sock = self._client.socket()
        if not isinstance(sock, socket.socket):
            self._retry("paho returned no socket")
            return
        self._watch(sock)

    def _retry(self, why: str) -> None:
        if self._closed:
            return
        log.warning("upstream %s: %s; retrying in %.1f s", self.target, why, self._backoff_s)
        delay, self._backoff_s = self._backoff_s, min(self._backoff_s * 2, _RECONNECT_MAX_S)
        self.loop.call_later(delay, self._probe)

    def _connected(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("upstream %s refused us: %s", self.target, reason)
            return  # the broker closes the socket: _lost retries
        # Every gateway's status, not only the upstream's: a pool member's Last Will says
        # which jobs to send to the pool again.
        status = f"hearth/v1/gw/{self.upstream_id or '+'}/status"
        every = "hearth/v1/gw/+/status"
        topics = [(self._reply_topic, 1), (status, 1)] + ([(every, 1)] if status != every else [])
        self._client.subscribe(topics)
        self.connected = True
        self._backoff_s = 0.5
        self._audit(
            self._gateway_id,
            "egress:connect",
            str(self.target),
            "allowed",
            f"as {self.client_id}; {self._what}",
        )
        log.info("connected to upstream %s as %s", self.target, self.client_id)

    def _disconnected(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        was = self.connected
        self.connected = False
        self.upstream_online = False
        if was and not self._closed:
            log.warning("lost the upstream connection (%s)", reason)

    def _lost(self) -> None:
        self._unwatch()
        self.connected = False
        self.upstream_online = False
        self._mids.clear()
        self._on_lost()
        self._retry("connection lost")

    def _message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._reply_topic:
            correlation = getattr(msg.properties, "CorrelationData", None)
            if correlation:
                self._on_reply(bytes(correlation), bytes(msg.payload))
            return
        try:
            status = decode_status(msg.payload)
        except HearthError:
            return
        if status.state == "offline" and status.gateway_id in self.members:
            self._on_member_lost(status.gateway_id)
            return
        if self.target.gateway_id and status.gateway_id != self.target.gateway_id:
            return
        if self._on_status is not None and status.gateway_id == (self.upstream_id or ""):
            self._on_status(status)  # its queue and accelerators: peer selection reads them
        if status.state == "online" and not self.upstream_online:
            if not self.upstream_id:
                self.upstream_id = status.gateway_id
            if status.gateway_id == self.upstream_id:
                self.upstream_online = True
                log.info("upstream gateway %s (tier %s) is online", status.gateway_id, status.tier)
        elif status.state == "offline" and status.gateway_id == self.upstream_id:
            self.upstream_online = False
            if not self.target.gateway_id:
                self.upstream_id = ""  # learn it afresh: another gateway may take over
            self._on_lost()

    def _subscribed(self, _c: mqtt.Client, _u: Any, _mid: int, reasons: Any, _p: Any) -> None:
        # A broker's ACL may refuse a subscription (a paired device may read only its own
        # gateway's status): then the upstream never looks online and nothing is forwarded.
        for reason in reasons:
            if getattr(reason, "is_failure", False):
                log.warning(
                    "upstream %s refused a subscription: %s; set upstream_gateway_id?",
                    self.target,
                    reason,
                )

    def _published(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        correlation = self._mids.pop(mid, None)
        # MQTT 5: a broker that refuses a publish (its ACL) says so in the PUBACK.
        if correlation is not None and getattr(reason, "is_failure", False):
            self._on_refused(correlation, f"the upstream broker refused it: {reason}")

    def close(self) -> None:
        """Disconnect. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._probe_sock is not None:
            self.loop.remove_writer(self._probe_sock.fileno())
            self._probe_sock.close()
            self._probe_sock = None
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        if self.connected:
            self._client.disconnect()
            self._flush()
        self._unwatch()
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            sock.close()
