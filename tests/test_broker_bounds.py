"""The managed broker bounds what it holds for a client that does not read: three consumers
that subscribe and then never read a byte, and 200 MB published to each of them, leave the
broker's resident memory within its per-client bounds (broker.py), and what it dropped is
counted in the gateway's status."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from hearth.transport import BrokerAddress, connect, make_client
from hearth_gateway.broker import INFLIGHT_BYTES, QUEUED_BYTES, mosquitto_config
from testkit.gateway import GatewayProcess
from testkit.wait import wait_until

CONSUMERS = 3
MESSAGE_BYTES = 256 * 1024
MESSAGES = 800  # 200 MB for each consumer


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _mqtt_string(text: str) -> bytes:
    return struct.pack("!H", len(text)) + text.encode()


class SlowConsumer:
    """A raw MQTT 3.1.1 client: CONNECT, SUBSCRIBE at QoS 1, then it never reads again (its
    receive buffer is small, so the broker soon has to hold what it sends)."""

    def __init__(self, address: BrokerAddress, topic_filter: str, name: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((address.host, address.port))
        connect_body = b"\x00\x04MQTT\x04\x02\x00\x3c" + _mqtt_string(name)
        self.sock.sendall(bytes([0x10, len(connect_body)]) + connect_body)
        subscribe_body = b"\x00\x01" + _mqtt_string(topic_filter) + b"\x01"
        self.sock.sendall(bytes([0x82, len(subscribe_body)]) + subscribe_body)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def managed(make_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    return make_gateway(managed=True)


def test_the_generated_config_bounds_each_clients_queue() -> None:
    conf = mosquitto_config(BrokerAddress("127.0.0.1", 1883), Path("/x"), 1)
    assert f"max_inflight_bytes {INFLIGHT_BYTES}" in conf
    assert f"max_queued_bytes {QUEUED_BYTES}" in conf
    assert "max_queued_messages " in conf


def test_consumers_that_never_read_do_not_grow_the_broker_without_bound(
    managed: GatewayProcess,
) -> None:
    gw = managed
    broker_pid = gw.snapshot().broker_pid
    assert broker_pid is not None
    topic = f"test/slow/{os.getpid()}"
    before = _rss_bytes(broker_pid)
    publisher = make_client(f"flood-{os.getpid()}")
    connect(publisher, gw.listen)
    payload = os.urandom(MESSAGE_BYTES)
    with ExitStack() as stack:
        for i in range(CONSUMERS):
            consumer = SlowConsumer(gw.listen, topic, f"slow-{i}-{os.getpid()}")
            stack.callback(consumer.close)
        time.sleep(0.5)  # subscribed
        peak = before
        for n in range(MESSAGES):
            publisher.publish(topic, payload, qos=1).wait_for_publish(10)
            if n % 50 == 0:
                peak = max(peak, _rss_bytes(broker_pid))
        time.sleep(1)
        peak = max(peak, _rss_bytes(broker_pid))
        # The counter comes with Mosquitto's $SYS interval, the status every 2 s.
        assert wait_until(lambda: gw.snapshot().broker_dropped > 0, timeout_s=20)
        dropped = gw.snapshot().broker_dropped
    publisher.disconnect()
    publisher.loop_stop()
    sent = CONSUMERS * MESSAGES * MESSAGE_BYTES
    growth = peak - before
    bound = CONSUMERS * (INFLIGHT_BYTES + QUEUED_BYTES + 2 * MESSAGE_BYTES) + 32 * 1024 * 1024
    print(
        f"\nbroker RSS {before / 1e6:.0f} MB -> peak {peak / 1e6:.0f} MB with {sent / 1e6:.0f} MB"
        f" for {CONSUMERS} consumers that never read; {dropped} messages dropped (status)"
    )
    assert growth < bound
    assert dropped >= CONSUMERS * MESSAGES // 2  # most of it: they read nothing
