"""The box owner lets a paired LAN device publish and subscribe under topic trees
(``hearth-gateway devices grant``), so a Hearth-paired sensor feeds a task; everything else
stays refused by the broker's ACL (MQTT 5: PUBACK 0x87), and ``ungrant`` takes it back at once.
A real gateway with its managed Mosquitto, TLS listeners on 127.0.0.1, a real paired device."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from hearth.pairing import pair
from hearth.transport import BrokerAddress, TlsFiles, connect, make_client
from helpers import Bus
from testkit.gateway import GatewayProcess
from testkit.net import free_port
from testkit.wait import wait_until

DEVICE = "hall-sensor"
NOT_AUTHORIZED = 0x87


class Paired:
    """The gateway, its listeners, and the device's own MQTT 5 connection (mutual TLS)."""

    def __init__(self, gw: GatewayProcess, lan: BrokerAddress, pairing: BrokerAddress) -> None:
        self.gw, self.lan, self.pairing = gw, lan, pairing
        self.acks: queue.Queue[tuple[int, int]] = queue.Queue()  # (mid, reason code)
        self.heard: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client: mqtt.Client | None = None

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "hearth_gateway.cli", *args]
        return subprocess.run(
            [*argv, "--state-dir", str(self.gw.state_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def pair_and_connect(self, directory: Path) -> None:
        issued = json.loads(self.admin("pair", "--json").stdout)
        pair(
            issued["code"],
            str(self.pairing),
            ca_fingerprint=issued["ca_fingerprint"],
            device_id=DEVICE,
            directory=directory,
            timeout_s=10,
        )
        files = directory / "gateways" / self.gw.gateway_id
        tls = TlsFiles(str(files / "ca.pem"), str(files / "device.pem"), str(files / "device.key"))
        client = make_client(DEVICE, tls=tls)
        client.on_publish = lambda _c, _u, mid, reason, _p: self.acks.put((mid, reason.value))
        client.on_message = lambda _c, _u, m: self.heard.put((m.topic, bytes(m.payload)))
        connect(client, self.lan)
        self.client = client

    def publish(self, topic: str, payload: bytes) -> int:
        """The broker's reason code for a QoS 1 publish."""
        assert self.client is not None
        mid = self.client.publish(topic, payload, qos=1).mid
        while True:
            got, reason = self.acks.get(timeout=10)
            if got == mid:
                return reason

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


@pytest.fixture
def paired(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    lan = BrokerAddress("127.0.0.1", free_port())
    pairing = BrokerAddress("127.0.0.1", free_port())
    gw = make_gateway("--lan-listen", str(lan), "--pairing-listen", str(pairing), managed=True)
    monkeypatch.setenv("HEARTH_CONFIG_DIR", str(tmp_path / "device"))
    device = Paired(gw, lan, pairing)
    device.pair_and_connect(tmp_path / "device")
    yield device
    device.close()


def test_a_device_granted_home_sensors_feeds_a_task_and_cannot_touch_the_locks(
    paired: Paired, examples: Path
) -> None:
    # Before any grant: the protocol's topics only.
    assert paired.publish("home/sensors/motion", b"1") == NOT_AUTHORIZED
    granted = paired.admin(
        "devices", "grant", DEVICE, "--publish", "home/sensors/#", "--subscribe", "home/lights/#"
    )
    assert granted.returncode == 0, granted.stderr
    assert "home/sensors/#" in granted.stdout
    installed = paired.admin(
        "tasks",
        "install",
        str(examples / "tasks" / "motion_light.wasm"),
        "--name",
        "hall-light",
        "--on",
        "home/sensors/motion",
        "--every",
        "30",
        "--may-publish",
        "home/lights/hall/set",
    )
    assert installed.returncode == 0, installed.stderr
    assert paired.client is not None
    paired.client.subscribe("home/lights/#", qos=1)
    with Bus(paired.gw.listen) as light:  # the light, on the loopback listener
        light.subscribe("home/lights/hall/set")
        assert paired.publish("home/sensors/motion", b"1") == 0
        assert light.expect("home/lights/hall/set") == b"ON"  # the sensor fed the task
    assert paired.heard.get(timeout=10) == ("home/lights/hall/set", b"ON")  # --subscribe
    assert paired.publish("home/locks/front", b"open") == NOT_AUTHORIZED

    listing = paired.admin("devices", "grants", "--json")
    assert json.loads(listing.stdout) == {
        "device_id": DEVICE,
        "publish": ["home/sensors/#"],
        "subscribe": ["home/lights/#"],
    }
    ungranted = paired.admin("devices", "ungrant", DEVICE, "--publish", "home/sensors/#")
    assert ungranted.returncode == 0, ungranted.stderr
    # The broker reloads its ACL on the SIGHUP the gateway sends it: moments, not at once.
    assert wait_until(
        lambda: paired.publish("home/sensors/motion", b"1") == NOT_AUTHORIZED, timeout_s=10
    )


def test_a_grant_under_the_protocols_topics_or_for_a_stranger_is_refused(paired: Paired) -> None:
    for args in (
        (DEVICE, "--publish", "hearth/v1/gw/x/req/other"),
        (DEVICE, "--subscribe", "#"),
        (DEVICE, "--publish", "$SYS/#"),
        ("stranger", "--publish", "home/sensors/#"),
    ):
        refused = paired.admin("devices", "grant", *args)
        assert refused.returncode == 1, args
        assert "bad_params" in refused.stderr
