"""A raw MQTT 5 device for tests: sends arbitrary bytes (valid or not) to a gateway and
collects what comes back, without the SDK's help."""

from __future__ import annotations

import hashlib
import queue
import time
import uuid
from typing import Any

import msgspec
import paho.mqtt.client as mqtt

from hearth.protocol import (
    BlobChunk,
    DataClass,
    Reply,
    decode_reply,
    encode,
    reply_topic,
    request_topic,
)
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

    def upload(
        self,
        data: bytes,
        sha256: str | None = None,
        chunk: int = 1 << 20,
        data_class: DataClass = "private",
    ) -> Reply:
        sha = sha256 or hashlib.sha256(data).hexdigest()
        correlation = uuid.uuid4().bytes
        offset = 0
        while True:
            part = data[offset : offset + chunk]
            self.send(
                BlobChunk(
                    sha256=sha, size=len(data), offset=offset, data=part, data_class=data_class
                ),
                correlation,
            )
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


class Bus:
    """A plain MQTT client standing in for LAN devices: sensors that publish, lights that
    listen."""

    def __init__(self, address: BrokerAddress) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._client = make_client(f"bus-{uuid.uuid4().hex[:8]}")
        self._client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        self._subscribed: queue.Queue[bool] = queue.Queue()
        self._client.on_subscribe = lambda *_: self._subscribed.put(True)
        connect(self._client, address)

    def subscribe(self, topic_filter: str) -> None:
        self._client.subscribe(topic_filter, qos=1)
        self._subscribed.get(timeout=5)

    def publish(self, topic: str, payload: bytes | str) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self._client.publish(topic, data, qos=1).wait_for_publish(5)

    def expect(self, topic: str, timeout_s: float = 10.0) -> bytes:
        """The next message on ``topic`` (others are discarded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"nothing on {topic} within {timeout_s} s")
            try:
                got, payload = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if got == topic:
                return payload

    def drain(self, quiet_s: float = 0.5) -> list[tuple[str, bytes]]:
        got: list[tuple[str, bytes]] = []
        while True:
            try:
                got.append(self.messages.get(timeout=quiet_s))
            except queue.Empty:
                return got

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
