"""The gateway's MQTT 5 connection, driven by the daemon's loop: requests in, replies and
retained status out.

paho runs without its own thread: the loop calls ``loop_read`` when the socket is readable,
``loop_write`` while paho has bytes queued, and ``loop_misc`` every second (keep-alive). A
publish from the loop's thread goes straight to the socket.

The Last Will is the retained ``offline`` status, so devices learn within one broker tick that a
gateway died (SIGKILL included: the broker sees the socket close). The session is persistent
(clean_start false, one hour expiry) so requests sent during a short disconnect are delivered
afterwards; durability itself rests on the journal, not on the broker.

Requests are acknowledged (PUBACK) by us, not by paho: in the order they came, each once the
handler's receipt says the journal row covering it is committed (store.py), or at once when it
returned none. ``release_acks`` runs at the end of each turn of the loop, after the commit.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions

from hearth.errors import GatewayUnavailable
from hearth.protocol import request_filter, status_topic
from hearth.transport import (
    BrokerAddress,
    fast_publish_decoding,
    make_client,
    properties,
    reply_properties,
)
from hearth_gateway._paho_io import LoopDriven
from hearth_gateway.loop import Loop
from hearth_gateway.reply_to import ReplyTo

__all__ = ["GatewayLink", "RequestHandler"]

log = logging.getLogger(__name__)


class Pending(Protocol):
    """What a handler returns for a request whose acknowledgement must wait (a journaled
    job): acknowledged once ``durable``."""

    @property
    def durable(self) -> bool: ...


# (request topic, payload, who sent it and where the answer goes) -> what its ack waits for
RequestHandler = Callable[[str, bytes, ReplyTo], Pending | None]

_SESSION_EXPIRY_S = 3600
_PROTOCOL_PREFIX = "hearth/"
_KEEPALIVE_S = 15
_RECONNECT_MAX_S = 10.0


def _trigger_options() -> SubscribeOptions:
    # QoS 1 for durability; retained messages only on a new subscription, so a reconnect or a
    # restart does not replay a sensor's retained value as a fresh event.
    return SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)


class GatewayLink(LoopDriven):
    def __init__(
        self,
        loop: Loop,
        address: BrokerAddress,
        gateway_id: str,
        *,
        on_request: RequestHandler,
        offline_status: bytes,
        on_other: Callable[[str, bytes], None] | None = None,
        credentials: tuple[str, str] | None = None,
        session_expiry_s: int = _SESSION_EXPIRY_S,
        extra_status: tuple[str, bytes] | None = None,
        shared_filter: str = "",
    ) -> None:
        self.loop = loop
        self.address = address
        self._gateway_id = gateway_id
        self._on_request = on_request
        self._on_other = on_other  # messages outside the protocol's topics: task triggers
        self._filters: set[str] = set()
        self._status_topic = status_topic(gateway_id)
        self._client = make_client(
            f"hearth-gw-{gateway_id}", will=(self._status_topic, offline_status), max_inflight=256
        )
        if credentials is not None:
            # The managed broker's loopback account: the only one with the gateway's rights.
            self._client.username_pw_set(*credentials)
        self._client.manual_ack_set(True)  # after the journal's commit (release_acks)
        fast_publish_decoding(self._client)
        self._acks: deque[tuple[int, Pending | None]] = deque()  # QoS 1 requests, in order
        self._answered = False  # an answer went out since take_answered() last looked
        self._client.on_connect = self._connected
        self._client.on_message = self._message
        self._client.on_disconnect = self._disconnected
        self._offline_status = offline_status
        self._online_status: bytes | None = None
        self._closed = False
        self._backoff_s = 0.5
        # 0 for a pool member: a broker keeps a persistent session's shared subscription and
        # would queue a dead member's share of the pool's requests (docs/protocol.md §19).
        self._session_expiry_s = session_expiry_s
        self._extra_status = extra_status  # (topic, payload): the pool's, retained, each connect
        self._shared_filter = shared_filter  # a pool member's share of the pool's requests
        self.connected = False
        self.refused: str | None = None

    # -- connection ---------------------------------------------------------------------------

    def start(self, online_status: bytes, timeout_s: float = 10.0) -> None:
        """Connect, subscribe and announce; returns once the broker accepted us."""
        self._online_status = online_status
        self._open()
        self.loop.every(1.0, self._misc)
        if not self.loop.run_until(lambda: self.connected or self.refused is not None, timeout_s):
            raise GatewayUnavailable(f"no CONNACK from {self.address} within {timeout_s} s")
        if self.refused is not None:
            raise GatewayUnavailable(f"broker {self.address} refused us: {self.refused}")

    def _open(self) -> None:
        props = properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry_s
        self._client.connect(
            self.address.host,
            self.address.port,
            keepalive=_KEEPALIVE_S,
            clean_start=False,
            properties=props,
        )
        self._watch_client()

    def _watch_client(self) -> None:
        sock = self._client.socket()
        if not isinstance(sock, socket.socket):
            raise GatewayUnavailable("paho returned no socket")
        self._watch(sock)

    def _connected(self, _c: mqtt.Client, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.refused = str(reason)
            return
        # Message ids of the old connection mean nothing now: the broker sends again what we
        # had not acknowledged (the journal answers a job it has seen from its row).
        self._acks.clear()
        # On every (re)connect: after a broker restart the subscription and the retained
        # online status must be put back.
        self._client.subscribe(request_filter(self._gateway_id), qos=1)
        if self._shared_filter:
            self._client.subscribe(self._shared_filter, qos=1)
        for topic_filter in self._filters:
            self._client.subscribe(topic_filter, options=_trigger_options())
        if self._online_status is not None:
            self.publish_status(self._online_status)
            if self._extra_status is not None:
                topic, payload = self._extra_status
                props = properties(PacketTypes.PUBLISH, content_type=True)
                self._client.publish(topic, payload, qos=1, retain=True, properties=props)
        self.connected = True
        self._backoff_s = 0.5
        log.info("connected to broker %s", self.address)

    def _disconnected(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected = False
        if not self._closed:
            log.warning("lost the broker connection (%s)", reason)

    def _lost(self) -> None:
        self._unwatch()
        self.connected = False
        if self._closed:
            return
        delay, self._backoff_s = self._backoff_s, min(self._backoff_s * 2, _RECONNECT_MAX_S)
        self.loop.call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        if self._closed:
            return
        try:
            self._client.reconnect()
            self._watch_client()
        except (OSError, GatewayUnavailable) as exc:
            log.warning("reconnecting to %s failed: %s", self.address, exc)
            self._lost()

    # -- subscriptions and publishing ----------------------------------------------------------

    def subscribe(self, topic_filter: str, on: bool) -> None:
        """Add (or drop) a subscription that survives reconnects (QoS 1, persistent session:
        messages published while the gateway is down are delivered when it is back)."""
        if on:
            self._filters.add(topic_filter)
            if self.connected:
                self._client.subscribe(topic_filter, options=_trigger_options())
        else:
            self._filters.discard(topic_filter)
            if self.connected:
                self._client.unsubscribe(topic_filter)
        self._flush()

    def _message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        pending: Pending | None = None
        try:
            pending = self._handle(msg)
        finally:
            if msg.qos:
                self._acks.append((msg.mid, pending))

    @property
    def acks_waiting(self) -> bool:
        """Requests received and not acknowledged yet."""
        return bool(self._acks)

    def take_answered(self) -> bool:
        """Whether an answer went out since the last call."""
        answered, self._answered = self._answered, False
        return answered

    def release_acks(self) -> None:
        """Acknowledge, in order, the requests whose journal rows are committed (called at the
        end of each turn of the loop; an answer takes those ready with it)."""
        ready = self._acks_ready()
        if not ready:
            return
        # paho sends each one as it is queued: several leave in one TCP segment (one wake-up
        # of the broker) when corked.
        with self.corked() if ready > 1 else contextlib.nullcontext():
            self._ack(ready)

    def _acks_ready(self) -> int:
        ready = 0
        for _mid, pending in self._acks:
            if pending is not None and not pending.durable:
                break
            ready += 1
        return ready

    def _ack(self, count: int) -> None:
        for _ in range(count):
            self._client.ack(self._acks.popleft()[0], 1)
        self._flush()

    def _handle(self, msg: mqtt.MQTTMessage) -> Pending | None:
        topic = msg.topic  # paho decodes it on each access
        if not topic.startswith(_PROTOCOL_PREFIX):
            if self._on_other is not None:
                try:
                    self._on_other(topic, bytes(msg.payload))
                except Exception:
                    log.exception("unexpected error handling a message on %s", topic)
            return None
        props = msg.properties
        reply_to = ReplyTo(
            # Each request filter subscribed ends in "+", the sender's id.
            topic[topic.rfind("/") + 1 :],
            getattr(props, "ResponseTopic", None) or "",
            # The protocol requires it non-empty: an empty one is the same as none.
            getattr(props, "CorrelationData", None) or b"",
            msg.qos,
        )
        try:
            return self._on_request(topic, bytes(msg.payload), reply_to)
        except Exception:  # a handler's bug must not take the connection down
            log.exception("unexpected error handling a message on %s", topic)
            return None

    def publish_reply(self, reply_to: ReplyTo, payload: bytes) -> None:
        """An answer: on the request's Response Topic, with its Correlation Data, at the QoS
        the request came in with."""
        props = reply_properties(reply_to.correlation or None)
        ready = self._acks_ready()
        # The acknowledgements ready go with it, in one TCP segment.
        with self.corked() if ready else contextlib.nullcontext():
            self._client.publish(reply_to.topic, payload, qos=reply_to.qos, properties=props)
            self._ack(ready)
        self._answered = True

    def publish_plain(self, topic: str, payload: bytes) -> None:
        """A task's publish (raw bytes: it speaks to ordinary LAN devices) or a notification
        (a protocol message, under hearth/: with the Content Type). QoS 1, not retained."""
        props = None
        if topic.startswith(_PROTOCOL_PREFIX):
            props = properties(PacketTypes.PUBLISH, content_type=True)
        self._client.publish(topic, payload, qos=1, properties=props)
        self._flush()

    def publish_status(self, payload: bytes) -> None:
        if self._closed:
            # The offline status close() published is the last word: close() runs the loop
            # while it waits for that PUBACK, and a housekeeping tick there (the status
            # changed as the pool stopped) would publish "online" after it; the clean
            # DISCONNECT that follows sends no Last Will, so the broker would keep the stopped
            # gateway "online" and devices would send it jobs nobody answers.
            return
        props = properties(PacketTypes.PUBLISH, content_type=True)
        self._client.publish(self._status_topic, payload, qos=1, retain=True, properties=props)
        self._flush()

    def close(self, timeout_s: float = 2.0) -> None:
        """Publish the offline status, disconnect. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.connected:
            props = properties(PacketTypes.PUBLISH, content_type=True)
            info = self._client.publish(
                self._status_topic, self._offline_status, qos=1, retain=True, properties=props
            )
            self._flush()
            deadline = time.monotonic() + timeout_s
            self.loop.run_until(
                lambda: info.is_published() or self._sock is None,
                max(0.0, deadline - time.monotonic()),
            )
            self._client.disconnect()
            self._flush()
        self._unwatch()
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            sock.close()
