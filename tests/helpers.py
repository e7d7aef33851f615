"""A raw MQTT 5 device for tests: sends arbitrary bytes (valid or not) to a gateway and
collects what comes back, without the SDK's help."""

from __future__ import annotations

import hashlib
import queue
import uuid
from typing import Any

import msgspec
import paho.mqtt.client as mqtt

from hearth.protocol import BlobChunk, Reply, decode_reply, encode, reply_topic, request_topic
from hearth.transport import BrokerAddress, connect, make_client, publish_properties


class RawDevice:
    def __init__(self, address: BrokerAddress, gateway_id: str, client_id: str | None = None):
        self.gateway_id = gateway_id
        self.client_id = client_id or f"raw-{uuid.uuid4().hex[:8]}"
        self.replies: queue.Queue[tuple[bytes | None, bytes]] = queue.Queue()
        self._early: dict[bytes | None, list[bytes]] = {}
        self._client = make_client(f"{self.client_id}-conn")
        self._client.on_message = self._message
        subscribed = queue.Queue[bool]()
        self._client.on_subscribe = lambda *_: subscribed.put(True)
        connect(
            self._client,
            address,
            on_connected=lambda: self._client.subscribe(reply_topic(self.client_id), qos=1),
        )
        subscribed.get(timeout=5)

    def _message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.replies.put((getattr(msg.properties, "CorrelationData", None), msg.payload))

    def send(
        self,
        payload: bytes | msgspec.Struct,
        correlation: bytes | None = None,
        response_topic: str | None = None,
    ) -> bytes:
        correlation = correlation or uuid.uuid4().bytes
        if not isinstance(payload, bytes):
            payload = encode(payload)
        self._client.publish(
            request_topic(self.gateway_id, self.client_id),
            payload,
            qos=1,
            properties=publish_properties(
                response_topic or reply_topic(self.client_id), correlation
            ),
        ).wait_for_publish(5)
        return correlation

    def reply(self, correlation: bytes, timeout_s: float = 20.0) -> Reply:
        """The next reply carrying ``correlation`` (others are kept for their own turn)."""
        early = self._early.get(correlation)
        if early:
            return decode_reply(early.pop(0))
        while True:
            corr, payload = self.replies.get(timeout=timeout_s)
            if corr == correlation:
                return decode_reply(payload)
            self._early.setdefault(corr, []).append(payload)

    def request(self, payload: bytes | msgspec.Struct, timeout_s: float = 20.0) -> Reply:
        return self.reply(self.send(payload), timeout_s)

    def upload(self, data: bytes, sha256: str | None = None, chunk: int = 1 << 20) -> Reply:
        sha = sha256 or hashlib.sha256(data).hexdigest()
        correlation = uuid.uuid4().bytes
        offset = 0
        while True:
            part = data[offset : offset + chunk]
            self.send(BlobChunk(sha256=sha, size=len(data), offset=offset, data=part), correlation)
            offset += len(part)
            if offset >= len(data):
                break
        return self.reply(correlation)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> RawDevice:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
