"""The gateway's MQTT 5 connection: requests in, replies and retained status out.

The Last Will is the retained ``offline`` status, so devices learn within one broker tick that a
gateway died (SIGKILL included: the broker sees the socket close). The session is persistent
(clean_start false, one hour expiry) so requests sent during a short disconnect are delivered
afterwards; durability itself rests on the journal, not on the broker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes

from hearth.protocol import request_filter, status_topic
from hearth.transport import BrokerAddress, connect, make_client, properties

__all__ = ["GatewayLink", "RequestHandler"]

log = logging.getLogger(__name__)

# (topic, payload, response topic or None, correlation data or None, QoS of the request)
RequestHandler = Callable[[str, bytes, str | None, bytes | None, int], None]

_SESSION_EXPIRY_S = 3600


class GatewayLink:
    def __init__(
        self,
        address: BrokerAddress,
        gateway_id: str,
        on_request: RequestHandler,
        offline_status: bytes,
    ) -> None:
        self.address = address
        self._gateway_id = gateway_id
        self._on_request = on_request
        self._status_topic = status_topic(gateway_id)
        self._client = make_client(
            f"hearth-gw-{gateway_id}", will=(self._status_topic, offline_status), max_inflight=256
        )
        self._client.on_message = self._message
        self._client.on_disconnect = self._disconnected
        self._offline_status = offline_status
        self._online_status: bytes | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.connected = threading.Event()

    def start(self, online_status: bytes) -> None:
        self._online_status = online_status
        connect(
            self._client,
            self.address,
            clean_start=False,
            session_expiry_s=_SESSION_EXPIRY_S,
            on_connected=self._connected,
        )

    def _connected(self) -> None:
        # Runs on every (re)connect: after a broker restart the subscription and the retained
        # online status must be put back.
        self._client.subscribe(request_filter(self._gateway_id), qos=1)
        if self._online_status is not None:
            self.publish_status(self._online_status)
        self.connected.set()
        log.info("connected to broker %s", self.address)

    def _disconnected(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        if not self._closed:
            log.warning("lost the broker connection (%s); paho reconnects", reason)

    def _message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        try:
            self._on_request(msg.topic, bytes(msg.payload), response_topic, correlation, msg.qos)
        except Exception:  # keep paho's network thread alive whatever a handler does
            log.exception("unexpected error handling a message on %s", msg.topic)

    def publish_reply(
        self, topic: str, payload: bytes, correlation: bytes | None, qos: int = 1
    ) -> None:
        """Replies go out at the QoS the request came in with."""
        props = properties(PacketTypes.PUBLISH, content_type=True)
        if correlation is not None:
            props.CorrelationData = correlation
        self._client.publish(topic, payload, qos=qos, properties=props)

    def publish_status(self, payload: bytes) -> None:
        props = properties(PacketTypes.PUBLISH, content_type=True)
        self._client.publish(self._status_topic, payload, qos=1, retain=True, properties=props)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.connected.is_set():
            props = properties(PacketTypes.PUBLISH, content_type=True)
            info = self._client.publish(
                self._status_topic, self._offline_status, qos=1, retain=True, properties=props
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2)
            self._client.disconnect()
        self._client.loop_stop()
