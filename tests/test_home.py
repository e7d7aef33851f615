"""The home's own broker (docs/home.md): tasks on its topics, at least once across restarts of
either broker, grants bounded by the owner's policy, Home Assistant discovery and its switch
commands, and what a bad home broker does to the gateway (nothing). The home broker is a second
real Mosquitto; its sensors and lights are MQTT 3.1.1 clients, as zigbee2mqtt's are."""

from __future__ import annotations

import json
import queue
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from hearth.errors import JobError
from hearth_gateway.config import Config, load_config
from hearth_gateway.home import HomeTarget
from hearth_gateway.policy import home_grant_error, load_policy
from testkit.gateway import GatewayProcess
from testkit.home_broker import HomeBroker, HomeDevice
from testkit.wait import wait_until

MOTION = "zigbee2mqtt/hall_motion"
LIGHT = "zigbee2mqtt/hall_light/set"
DOOR = "zigbee2mqtt/front_door/set"


@pytest.fixture(scope="module")
def tasks_dir(examples: Path) -> Path:
    path = examples / "tasks"
    if not (path / "zigbee_light.wasm").exists():
        subprocess.run(
            [sys.executable, str(Path(__file__).parent.parent / "scripts" / "build_examples.py")],
            check=True,
        )
    return path


@pytest.fixture
def home(tmp_path: Path) -> Iterator[HomeBroker]:
    with HomeBroker(tmp_path) as broker:
        yield broker


def home_config(tmp_path: Path, broker: HomeBroker, **extra: object) -> list[str]:
    """--config and --policy for a gateway on ``broker``: tasks may read zigbee2mqtt/# and
    publish to lights and the front door (the grants then decide)."""
    lines = [f'home_broker = "{broker.url}"']
    for key, value in extra.items():
        lines.append(f"{key} = {json.dumps(value)}")
    config = tmp_path / f"home-{uuid.uuid4().hex[:6]}.toml"
    config.write_text("\n".join([*lines, ""]))
    policy = tmp_path / "home-policy.toml"
    if not policy.exists():
        policy.write_text(
            "[tasks]\n"
            'home_read = ["zigbee2mqtt/#"]\n'
            'home_publish = ["zigbee2mqtt/+/set"]\n'
            "max_backlog = 100\n"
        )
    return ["--config", str(config), "--policy", str(policy)]


def _audit(gateway: GatewayProcess, action: str) -> list[tuple[str, str, str, str]]:
    with sqlite3.connect(gateway.state_dir / "hearth.sqlite3") as db:
        rows = db.execute(
            "SELECT actor, target, decision, reason FROM audit WHERE action=? ORDER BY id",
            (action,),
        ).fetchall()
    return [tuple(map(str, row)) for row in rows]  # type: ignore[misc]


def _install_light(client, tasks_dir: Path, *, light: str = LIGHT, off_after_s: float = 1.0):  # type: ignore[no-untyped-def]
    return client.install_task(
        tasks_dir / "zigbee_light.wasm",
        "hall-light",
        on=[f"home:{MOTION}"],
        every_s=0.2,
        may_publish=[f"home:{LIGHT}"],
        config={"light_topic": f"home:{light}", "off_after_s": str(off_after_s)},
    )


def _wait_home_connected(gateway: GatewayProcess) -> None:
    assert wait_until(lambda: "connected to the home broker" in gateway.log(), 15)


def _motion_until_on(sensor: HomeDevice, light: HomeDevice) -> bytes:
    """The task's subscription reaches the home broker shortly after the install returns."""
    for _ in range(40):
        sensor.publish(MOTION, '{"occupancy":true,"battery":97}')
        try:
            return light.expect(LIGHT, timeout_s=0.5)[1]
        except TimeoutError:
            continue
    raise AssertionError("the light never went on")


def _off_repeats_then_on(light: HomeDevice) -> None:
    """The next ON, after any repeats of the last OFF. At least once: a gateway killed between
    sending an OFF and checkpointing it sends it again from its checkpoint, and a home broker
    killed before it saved the light's acknowledgement delivers it again from its disk. A light
    told OFF twice is still off; an ON must come, and only OFFs before it."""
    while (payload := light.expect(LIGHT, timeout_s=30)[1]) != b'{"state":"ON"}':
        assert payload == b'{"state":"OFF"}'


def test_motion_on_the_home_broker_turns_the_light_on_then_off(
    make_gateway: Callable[..., GatewayProcess], home: HomeBroker, tasks_dir: Path, tmp_path: Path
) -> None:
    gateway = make_gateway(*home_config(tmp_path, home))
    _wait_home_connected(gateway)
    light = HomeDevice(home.address, "hall-light", subscribe=(LIGHT,))
    sensor = HomeDevice(home.address, "hall-motion")
    try:
        with gateway.client() as client:
            _install_light(client, tasks_dir)
        assert _motion_until_on(sensor, light) == b'{"state":"ON"}'
        while (payload := light.expect(LIGHT)[1]) != b'{"state":"OFF"}':
            assert payload == b'{"state":"ON"}'  # another warm-up motion that went through
    finally:
        sensor.close()
        light.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_no_motion_is_lost_across_restarts_of_the_home_broker_and_the_gateway(
    make_gateway: Callable[..., GatewayProcess],
    home: HomeBroker,
    tasks_dir: Path,
    tmp_path: Path,
    protocol: str,
) -> None:
    gateway = make_gateway(*home_config(tmp_path, home, home_broker_protocol=protocol))
    _wait_home_connected(gateway)
    light = HomeDevice(home.address, "hall-light", subscribe=(LIGHT,))
    sensor = HomeDevice(home.address, "hall-motion")
    try:
        with gateway.client() as client:
            _install_light(client, tasks_dir)
        assert _motion_until_on(sensor, light) == b'{"state":"ON"}'
        # Under load a second motion of the warm-up may have gone through too: its ON first.
        while (payload := light.expect(LIGHT)[1]) != b'{"state":"OFF"}':
            assert payload == b'{"state":"ON"}'

        # The home broker dies and comes back; one motion before the gateway is back on it:
        # the gateway's saved session holds it.
        home.kill()
        home.start()
        assert sensor.connected.wait(10)
        sensor.publish(MOTION, '{"occupancy":true}')
        _off_repeats_then_on(light)  # the home broker may send its last OFF again, from disk
        assert light.expect(LIGHT)[1] == b'{"state":"OFF"}'

        # The gateway dies; a motion while it is down waits in its session on the home broker.
        gateway.kill()
        sensor.publish(MOTION, '{"occupancy":true}')
        gateway.start()
        _off_repeats_then_on(light)
        assert light.expect(LIGHT)[1] == b'{"state":"OFF"}'
        with pytest.raises(TimeoutError):
            light.expect(LIGHT, timeout_s=1.5)  # and nothing more: the light stays off
    finally:
        sensor.close()
        light.close()


def test_a_task_granted_the_hall_light_cannot_switch_the_front_door(
    make_gateway: Callable[..., GatewayProcess], home: HomeBroker, tasks_dir: Path, tmp_path: Path
) -> None:
    gateway = make_gateway(*home_config(tmp_path, home))
    _wait_home_connected(gateway)
    door = HomeDevice(home.address, "front-door", subscribe=(DOOR,))
    sensor = HomeDevice(home.address, "hall-motion")
    try:
        with gateway.client() as client:
            # Its module tries the front door; its grant is the hall light.
            info = _install_light(client, tasks_dir, light=DOOR)

            def refused() -> bool:
                sensor.publish(MOTION, '{"occupancy":true}')
                return any(t == f"home:{DOOR}" for _, t, _, _ in _audit(gateway, "publish"))

            assert wait_until(refused, 20, step_s=0.5)
            assert client.task(info.task_id).refused >= 1
            # A grant outside the trees the owner's policy opens is refused at install.
            with pytest.raises(JobError) as refusal:
                client.install_task(
                    tasks_dir / "zigbee_light.wasm",
                    "locks",
                    on=[f"home:{MOTION}"],
                    may_publish=["home:locks/front/set"],
                )
            assert refusal.value.code == "forbidden"
            assert "outside the home broker's trees" in str(refusal.value)
        with pytest.raises(TimeoutError):
            door.expect(DOOR, timeout_s=1.0)
        actor, _, decision, reason = next(
            row for row in _audit(gateway, "publish") if row[1] == f"home:{DOOR}"
        )
        assert (actor, decision) == (info.task_id, "refused")
        assert "grants" in reason
    finally:
        sensor.close()
        door.close()


# Home Assistant's MQTT discovery, as documented (www.home-assistant.io/integrations/mqtt,
# sensor.mqtt, binary_sensor.mqtt, switch.mqtt). The `homeassistant` package itself is not
# installed (hundreds of MiB, and its releases need a newer Python than this venv's 3.11), so
# the payloads are checked against these documented keys instead of its voluptuous schemas.
_COMMON_KEYS = {
    "name",
    "unique_id",
    "object_id",
    "default_entity_id",
    "state_topic",
    "value_template",
    "availability_topic",
    "payload_available",
    "payload_not_available",
    "availability",
    "availability_mode",
    "device",
    "origin",
    "json_attributes_topic",
    "icon",
    "json_attributes_template",
    "entity_category",
    "enabled_by_default",
    "qos",
    "encoding",
}  # fmt: skip - a set of names
_KEYS = {
    "sensor": _COMMON_KEYS
    | {
        "device_class",
        "state_class",
        "unit_of_measurement",
        "suggested_unit_of_measurement",
        "expire_after",
        "force_update",
    },
    "binary_sensor": _COMMON_KEYS | {"device_class", "payload_on", "payload_off", "expire_after"},
    "switch": _COMMON_KEYS
    | {
        "command_topic",
        "payload_on",
        "payload_off",
        "state_on",
        "state_off",
        "optimistic",
        "retain",
        "device_class",
    },
}  # fmt: skip - a table
_REQUIRED = {
    "sensor": {"state_topic"},
    "binary_sensor": {"state_topic"},
    "switch": {"command_topic"},
}
_DEVICE_KEYS = {
    "identifiers",
    "connections",
    "name",
    "manufacturer",
    "model",
    "sw_version",
    "hw_version",
    "via_device",
    "configuration_url",
    "suggested_area",
    "serial_number",
}  # fmt: skip - a set of names
_DEVICE_CLASSES = {
    "sensor": {"data_size", "timestamp", None},
    "binary_sensor": {"connectivity", None},
    "switch": {None, "switch", "outlet"},
}


def _check_discovery(component: str, config: dict[str, object]) -> None:
    assert set(config) <= _KEYS[component], set(config) - _KEYS[component]
    assert _REQUIRED[component] <= set(config)
    assert isinstance(config["unique_id"], str)
    assert config["unique_id"]
    assert config.get("device_class") in _DEVICE_CLASSES[component]
    device = config["device"]
    assert isinstance(device, dict)
    assert set(device) <= _DEVICE_KEYS
    assert device["identifiers"]
    for key in ("state_topic", "command_topic", "availability_topic"):
        topic = config.get(key)
        assert topic is None or (isinstance(topic, str) and "+" not in topic and "#" not in topic)
    if config.get("device_class") == "data_size":
        assert config["unit_of_measurement"] in {"B", "kB", "MB", "GB", "KiB", "MiB", "GiB"}


class _Watcher:
    """An MQTT 5 client of the home broker that keeps the retained flag of what it gets."""

    def __init__(self, broker: HomeBroker, topic_filter: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"w-{uuid.uuid4().hex[:6]}")
        client.on_message = lambda _c, _u, m: self.messages.put(
            (m.topic, bytes(m.payload), bool(m.retain))
        )
        client.connect(broker.address.host, broker.address.port)
        client.subscribe(topic_filter, qos=1)
        client.loop_start()
        self._client = client

    def collect(
        self, done: Callable[[dict[str, tuple[bytes, bool]]], bool], timeout_s: float = 15.0
    ) -> dict[str, tuple[bytes, bool]]:
        seen: dict[str, tuple[bytes, bool]] = {}
        deadline = time.monotonic() + timeout_s
        while not done(seen):
            left = deadline - time.monotonic()
            assert left > 0, f"not there within {timeout_s} s; seen {sorted(seen)}"
            try:
                topic, payload, retained = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            seen[topic] = (payload, retained)
        return seen

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def test_home_assistant_discovery_is_retained_valid_and_follows_the_task(
    make_gateway: Callable[..., GatewayProcess], home: HomeBroker, tasks_dir: Path, tmp_path: Path
) -> None:
    gateway = make_gateway(*home_config(tmp_path, home, home_assistant=True), start=False)
    node = "hearth_" + gateway.gateway_id.replace(".", "_")
    # Left by a task that went while the gateway was away: cleared when it comes back.
    stale = [
        f"homeassistant/switch/{node}/task_t-gone_switch/config",
        f"hearth/{gateway.gateway_id}/tasks/t-gone",
    ]
    leftover = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="leftover")
    leftover.connect(home.address.host, home.address.port)
    leftover.loop_start()
    for topic in stale:
        leftover.publish(topic, b'{"name":"old"}', qos=1, retain=True).wait_for_publish(5)
    leftover.disconnect()
    leftover.loop_stop()
    gateway.start()
    _wait_home_connected(gateway)
    with gateway.client() as client:
        info = _install_light(client, tasks_dir)
        tid = info.task_id
        switch = f"homeassistant/switch/{node}/task_{tid}_switch/config"
        first = _Watcher(home, "#")
        try:  # published: the task's too
            first.collect(lambda s: switch in s)
        finally:
            first.close()
        # A client that subscribes afterwards gets them: they are retained.
        watcher = _Watcher(home, "#")
        try:
            seen = watcher.collect(
                lambda s: switch in s and f"hearth/{gateway.gateway_id}/status" in s
            )
            configs = {t: p for t, (p, retained) in seen.items() if t.endswith("/config")}
            assert all(seen[t][1] for t in configs), "every discovery config is retained"
            components = {t.split("/")[1] for t in configs}
            assert components == {"sensor", "binary_sensor", "switch"}
            for topic, payload in configs.items():
                _check_discovery(topic.split("/")[1], json.loads(payload))
            objects = {t.split("/")[3] for t in configs}
            gateway_objects = {
                "online",
                "queue_length",
                "jobs_per_minute",
                "busy_workers",
                "paired_devices",
                "tasks_running",
                "tasks_suspended",
                "storage_free_bytes",
            }  # fmt: skip - a set of names
            assert gateway_objects <= objects
            assert {f"task_{tid}_state", f"task_{tid}_last_event", f"task_{tid}_switch"} <= objects
            mirror = json.loads(seen[f"hearth/{gateway.gateway_id}/status"][0])
            assert mirror["tasks_running"] == 1
            assert mirror["state"] == "online"
            assert seen[f"hearth/{gateway.gateway_id}/availability"] == (b"online", True)

            client.task(tid, "cancel")
            gone = watcher.collect(lambda s: s.get(switch, (b"x", False))[0] == b"")
            assert gone[switch] == (b"", False)
        finally:
            watcher.close()
    # A newcomer finds nothing of the cancelled task: the empty retained payload removed it.
    late = _Watcher(home, "#")
    try:
        seen = late.collect(lambda s: f"homeassistant/binary_sensor/{node}/online/config" in s)
        time.sleep(0.5)  # anything else retained arrives with it
        while not late.messages.empty():
            topic, payload, _ = late.messages.get()
            seen[topic] = (payload, True)
        assert not [t for t in seen if tid in t or "t-gone" in t]
    finally:
        late.close()

    # SIGKILL: the home broker publishes the gateway's Last Will.
    watcher = _Watcher(home, f"hearth/{gateway.gateway_id}/availability")
    try:
        watcher.collect(bool)
        gateway.kill()
        offline = watcher.collect(lambda s: any(p == b"offline" for p, _ in s.values()), 60)
        assert offline[f"hearth/{gateway.gateway_id}/availability"][0] == b"offline"
    finally:
        watcher.close()


def test_a_switch_command_acts_only_with_the_rights_of_the_tasks_owner(
    make_gateway: Callable[..., GatewayProcess], home: HomeBroker, tasks_dir: Path, tmp_path: Path
) -> None:
    gateway = make_gateway(*home_config(tmp_path, home, home_assistant=True))
    _wait_home_connected(gateway)
    ha = HomeDevice(home.address, "home-assistant")
    root = f"hearth/{gateway.gateway_id}/tasks"
    try:
        with gateway.client(client_id="hall-panel") as client:
            tid = _install_light(client, tasks_dir).task_id
            assert wait_until(
                lambda: f"task_{tid}" in str(_audit(gateway, "task_install")) or True, 1
            )
            ha.publish(f"{root}/hall-panel/{tid}/set", "OFF")
            assert wait_until(lambda: client.task(tid).state == "paused", 15)
            ha.publish(f"{root}/hall-panel/{tid}/set", "ON")
            assert wait_until(lambda: client.task(tid).state == "running", 15)
            # The same task commanded in another device's name: refused, audited.
            ha.publish(f"{root}/porch-camera/{tid}/set", "OFF")
            assert wait_until(
                lambda: any(r[2] == "refused" for r in _audit(gateway, "ha_command")), 15
            )
            assert client.task(tid).state == "running"
            # Neither ON nor OFF: refused too.
            ha.publish(f"{root}/hall-panel/{tid}/set", "TOGGLE")
            assert wait_until(
                lambda: sum(r[2] == "refused" for r in _audit(gateway, "ha_command")) == 2, 15
            )
            assert client.task(tid).state == "running"
        actor, target, _, reason = next(
            r for r in _audit(gateway, "ha_command") if r[2] == "refused"
        )
        assert (actor, target) == ("home-assistant:porch-camera", tid)
        assert "of yours" in reason
        allowed = [r for r in _audit(gateway, "ha_command") if r[2] == "allowed"]
        assert [r[3] for r in allowed] == ["pause", "resume"]
    finally:
        ha.close()


def test_a_home_broker_that_refuses_us_or_goes_away_leaves_the_gateway_serving(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, wasm: dict[str, Path]
) -> None:
    home = HomeBroker(tmp_path / "refusing", users={"hearth": "right"}).start()
    try:
        password = tmp_path / "home.pass"
        password.write_text("wrong\n")
        gateway = make_gateway(
            *home_config(
                tmp_path,
                home,
                home_broker_username="hearth",
                home_broker_password_file=str(password),
            )
        )
        assert wait_until(lambda: "refused us" in gateway.log(), 15)
        assert wait_until(lambda: "Not authorized" in gateway.snapshot().home_broker_state, 15)
        with gateway.client() as client:
            assert client.run_wasm(wasm["echo"], stdin=b"still here").stdout == b"still here"
            home.kill()  # and gone altogether
            assert client.run_wasm(wasm["echo"], stdin=b"still here").stdout == b"still here"
        assert gateway.log().count("refused us") == 1  # said once, not at each retry
        assert gateway.proc is not None
        assert gateway.proc.poll() is None
    finally:
        home.close()


def test_a_flood_on_a_granted_topic_is_dropped_and_counted_while_the_gateway_serves(
    make_gateway: Callable[..., GatewayProcess],
    home: HomeBroker,
    tasks_dir: Path,
    tmp_path: Path,
    wasm: dict[str, Path],
) -> None:
    gateway = make_gateway(*home_config(tmp_path, home))  # tasks.max_backlog = 100
    _wait_home_connected(gateway)
    light = HomeDevice(home.address, "hall-light", subscribe=(LIGHT,))
    sensor = HomeDevice(home.address, "hall-motion")
    flooder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flooder", protocol=mqtt.MQTTv311)
    flooder.connect(home.address.host, home.address.port)
    flooder.loop_start()
    try:
        with gateway.client() as client:
            tid = _install_light(client, tasks_dir).task_id
            _motion_until_on(sensor, light)
            sent = 0
            began = time.monotonic()
            answered = []
            while time.monotonic() - began < 2.0:  # 10,000 a second, for 2 s
                for _ in range(100):
                    flooder.publish(MOTION, b'{"occupancy":true}', qos=0)
                sent += 100
                if sent % 5000 == 0:  # meanwhile, ordinary work is served
                    answered.append(client.run_wasm(wasm["echo"], stdin=b"x").stdout)
                time.sleep(max(0.0, began + sent / 10_000 - time.monotonic()))
            assert answered
            assert all(a == b"x" for a in answered)
            assert wait_until(lambda: client.task(tid).dropped > 0, 30)
            info = client.task(tid)
            assert info.state == "running"
            assert client.run_wasm(wasm["echo"], stdin=b"after").stdout == b"after"
    finally:
        flooder.disconnect()
        flooder.loop_stop()
        sensor.close()
        light.close()


def test_the_example_home_configuration_and_policy_load() -> None:
    examples = Path(__file__).parent.parent / "examples" / "home"
    config = load_config(examples / "gateway.toml")
    assert config.home_broker.startswith("mqtt://")
    assert config.home_assistant
    policy = load_policy([examples / "home-policy.toml"])
    assert policy.tasks.home_publish == ["zigbee2mqtt/+/set"]


def test_the_home_broker_password_comes_from_the_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "home-broker-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    config = Config(home_broker="mqtt://ha.local", home_broker_username="hearth")
    target = HomeTarget.from_config(config, "gw-1")
    assert target is not None
    assert (target.username, target.password) == ("hearth", "s3cret")
    assert str(target.address) == "ha.local:1883"
    named = tmp_path / "file.pass"
    named.write_text("from-file")
    config = Config(home_broker="mqtts://ha.local", home_broker_password_file=str(named))
    target = HomeTarget.from_config(config, "gw-1")
    assert target is not None
    assert (target.password, target.tls, target.address.port) == ("from-file", True, 8883)


def test_home_grants_are_bounded_by_the_owners_trees() -> None:
    trees = ["zigbee2mqtt/+/set"]
    assert home_grant_error("home:zigbee2mqtt/hall_light/set", trees, enabled=True) is None
    assert "outside" in str(home_grant_error("home:locks/front/set", trees, enabled=True))
    assert "outside" in str(home_grant_error("home:zigbee2mqtt/#", trees, enabled=True))
    assert "gateway's own" in str(home_grant_error("home:hearth/x/status", ["#"], enabled=True))
    assert "no home broker" in str(home_grant_error("home:zigbee2mqtt/a/set", trees, enabled=False))
