"""The gateway's retained status on a real Mosquitto: once the link closes, "offline" stays."""

from __future__ import annotations

import threading
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hearth.protocol import GatewayStatus
from hearth.protocol.codec import decode_status, encode
from hearth.protocol.topics import status_topic
from hearth_gateway.link import GatewayLink
from hearth_gateway.loop import Loop
from testkit.mosquitto import Mosquitto


def _retained_state(broker: Mosquitto, gateway_id: str) -> str:
    """The state a device that subscribes now is told (the retained status)."""
    got: list[str] = []
    arrived = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(decode_status(msg.payload).state)
        arrived.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(status_topic(gateway_id), qos=1)
    client.connect(broker.address.host, broker.address.port)
    client.loop_start()
    try:
        assert arrived.wait(10.0), "no retained status"
    finally:
        client.loop_stop()
        client.disconnect()
    return got[-1]


def test_a_status_published_while_the_link_closes_does_not_undo_offline(
    broker: Mosquitto,
) -> None:
    """What a stopping daemon did: its housekeeping tick (the status changed as its workers
    stopped) fired while close() ran the loop waiting for the offline PUBACK, and published
    "online" after "offline"; the clean DISCONNECT sends no Last Will, so the stopped gateway
    stayed online on the broker and a device's next job went to nobody."""
    gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
    online = encode(GatewayStatus(gateway_id=gateway_id, state="online"))
    offline = encode(GatewayStatus(gateway_id=gateway_id, state="offline"))
    busy = encode(GatewayStatus(gateway_id=gateway_id, state="online", workers=0))
    loop = Loop()
    link = GatewayLink(
        loop, broker.address, gateway_id, on_request=lambda *_: None, offline_status=offline
    )
    link.start(online)
    assert _retained_state(broker, gateway_id) == "online"
    # Due at once: it runs inside close(), on the loop turn that waits for the PUBACK.
    loop.call_later(0.0, lambda: link.publish_status(busy))
    link.close()
    link.publish_status(busy)  # and after it, too, nothing goes out
    loop.close()
    assert _retained_state(broker, gateway_id) == "offline"
