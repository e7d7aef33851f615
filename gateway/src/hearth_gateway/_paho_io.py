"""paho driven by the daemon's event loop (loop.py) instead of a thread of its own: the loop
watches the client's socket and calls paho's read, write and housekeeping steps. Shared by the
broker link (link.py) and the upstream link (upstream_link.py)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from hearth_gateway.loop import Loop

__all__ = ["LoopDriven", "PublishProperties", "fast_publish_decoding"]

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


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
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
            pos = _varint(view, pos)[1]
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
            length, pos = _varint(view, pos)
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
        client._handle_on_message(message)
        if qos and not client._manual_ack:
            return client._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    client._handle_publish = handle_publish  # type: ignore[method-assign]


class LoopDriven:
    """Base for a paho client on the loop. Subclasses set ``loop`` and ``_client``, call
    ``_watch(sock)`` once connected and ``_misc`` every second or so, and implement
    ``_lost`` (the connection broke: unwatch and reconnect as suits them)."""

    loop: Loop
    _client: mqtt.Client
    _sock: socket.socket | None = None
    _fd: int = -1  # kept: paho may close the socket before we unregister it
    _writing: bool = False  # watching for writability (paho had more than the socket took)

    def _lost(self) -> None:
        raise NotImplementedError

    def _watch(self, sock: socket.socket) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self.loop.add_reader(self._fd, self._readable)
        self._flush()

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """What paho writes inside goes out in as few TCP segments as fit (TCP_CORK): an
        answer and the acknowledgements after it cost the broker one wake-up, not two."""
        sock = self._sock
        cork = getattr(socket, "TCP_CORK", None)
        if sock is None or cork is None:
            yield
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, cork, 0)

    def _unwatch(self) -> None:
        if self._sock is not None:
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
            self._writing = False
            self._sock = None
            self._fd = -1

    def _readable(self) -> None:
        if self._client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
            self._lost()
            return
        self._flush()

    def _flush(self) -> None:
        """Write what paho has queued; if the socket is full, finish when it is writable."""
        if self._sock is None:
            return
        if self._client.want_write() and self._client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
            self._lost()
            return
        # Only a change of state touches the selector: most flushes write everything at once.
        if self._client.want_write():
            if not self._writing:
                self.loop.add_writer(self._fd, self._flush)
                self._writing = True
        elif self._writing:
            self.loop.remove_writer(self._fd)
            self._writing = False

    def _misc(self) -> None:
        if self._sock is None:
            return
        if self._client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
            self._lost()
            return
        self._flush()
