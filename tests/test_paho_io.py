"""Our own PUBLISH decoder (hearth.transport: the daemon's and the SDK's) reads what paho's
reads: topic, message id, payload, Response Topic, Correlation Data, Content Type; packets it
does not take go to paho's decoder. Pure logic: packets made by paho's own encoder, no broker."""

from __future__ import annotations

import gc
import os
import struct

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hearth.transport import PublishProperties, fast_publish_decoding


def _packet(topic: str, payload: bytes, qos: int, props: Properties | None) -> tuple[int, bytes]:
    """(fixed-header byte, variable header and payload) of a PUBLISH, as paho's reader has them."""
    body = struct.pack("!H", len(topic)) + topic.encode()
    if qos:
        body += struct.pack("!H", 42)
    body += props.pack() if props is not None else b"\x00"
    return 0x30 | (qos << 1), body + payload


def _decode(header: int, body: bytes, *, fast: bool) -> mqtt.MQTTMessage:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.manual_ack_set(True)
    got: list[mqtt.MQTTMessage] = []
    client.on_message = lambda _c, _u, msg: got.append(msg)
    if fast:
        fast_publish_decoding(client)
    client._in_packet["command"] = header
    client._in_packet["packet"] = body
    client._handle_publish()
    (message,) = got
    return message


def _props(**values: object) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return props


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize(
    "props",
    [
        None,
        _props(ResponseTopic="hearth/v1/reply/dev-1", CorrelationData=b"\x00corr"),
        _props(
            ResponseTopic="r/é",
            CorrelationData=b"c",
            ContentType="application/msgpack",
            PayloadFormatIndicator=0,
            MessageExpiryInterval=30,
            UserProperty=[("a", "b"), ("c", "d")],
        ),
    ],
)
def test_it_reads_what_paho_reads(qos: int, props: Properties | None) -> None:
    payload = os.urandom(1 << 20)
    header, body = _packet("hearth/v1/gw/req/dev-1", payload, qos, props)
    ours, paho = _decode(header, body, fast=True), _decode(header, body, fast=False)
    assert isinstance(ours.properties, PublishProperties)
    assert (ours.topic, ours.mid, ours.qos, ours.payload) == (
        paho.topic,
        paho.mid,
        paho.qos,
        paho.payload,
    )
    for name in ("ResponseTopic", "CorrelationData", "ContentType"):
        assert getattr(ours.properties, name) == getattr(paho.properties, name, None)


def test_a_property_it_does_not_take_goes_to_paho() -> None:
    # Subscription Identifier is known; this id (0x42) is not a PUBLISH property at all.
    header, body = _packet("t", b"x", 1, None)
    body = body.replace(b"\x00x", b"\x02\x42\x00x")  # properties: 2 bytes, id 0x42
    with pytest.raises(MalformedPacket):  # paho's own verdict on it
        _decode(header, body, fast=True)


def test_a_message_leaves_no_garbage_for_the_cyclic_collector() -> None:
    """paho's own delivery looks the topic up among filtered callbacks with a recursive
    closure: a reference cycle per message. Ours skips the lookup when there is none."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.manual_ack_set(True)
    got: list[int] = []
    client.on_message = lambda _c, _u, msg: got.append(len(msg.payload))
    fast_publish_decoding(client)
    header, body = _packet("hearth/v1/gw/req/dev-1", b"job", 1, _props(CorrelationData=b"c"))
    gc.collect()
    gc.disable()
    try:
        for _ in range(200):
            client._in_packet["command"] = header
            client._in_packet["packet"] = body
            client._handle_publish()
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert got == [3] * 200


def test_filtered_callbacks_still_get_their_messages() -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    filtered: list[str] = []
    client.message_callback_add("hearth/#", lambda _c, _u, msg: filtered.append(msg.topic))
    client.on_message = lambda _c, _u, _msg: pytest.fail("a filtered callback took it")
    fast_publish_decoding(client)
    header, body = _packet("hearth/v1/gw/req/dev-1", b"job", 0, None)
    client._in_packet["command"] = header
    client._in_packet["packet"] = body
    client._handle_publish()
    assert filtered == ["hearth/v1/gw/req/dev-1"]
