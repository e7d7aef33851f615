"""Revoking a device suspends its persistent tasks at once: after ``hearth-gateway devices
revoke`` returns, a subscriber on the broker hears nothing more from them. Their state stays:
the box owner may cancel them, and the device, paired again under the same id, may resume
them. Each step is audited. A real gateway with its managed Mosquitto, TLS listeners on
127.0.0.1, a real paired device."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hearth import Client
from hearth.errors import ErrorCode, JobError
from hearth.pairing import pair
from hearth.transport import BrokerAddress
from helpers import Bus
from testkit.gateway import GatewayProcess
from testkit.net import free_port

DEVICE = "lamp-1"


class Secure:
    def __init__(self, gw: GatewayProcess, pairing: BrokerAddress, lan: BrokerAddress) -> None:
        self.gw, self.pairing, self.lan = gw, pairing, lan

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "hearth_gateway.cli",
                *args,
                "--state-dir",
                str(self.gw.state_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def pair(self, directory: Path) -> None:
        issued = json.loads(self.admin("pair", "--json").stdout)
        pair(
            issued["code"],
            str(self.pairing),
            ca_fingerprint=issued["ca_fingerprint"],
            device_id=DEVICE,
            directory=directory,
            timeout_s=10,
        )

    def task(self, task_id: str) -> dict[str, Any]:
        listing = self.admin("tasks", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        return next(t for t in json.loads(listing.stdout) if t["task_id"] == task_id)

    def audit(self, *flags: str) -> list[dict[str, Any]]:
        result = self.admin("audit", "--json", "--limit", "1000", *flags)
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def secure(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Secure:
    lan = BrokerAddress("127.0.0.1", free_port())
    pairing = BrokerAddress("127.0.0.1", free_port())
    gw = make_gateway("--lan-listen", str(lan), "--pairing-listen", str(pairing), managed=True)
    monkeypatch.setenv("HEARTH_CONFIG_DIR", str(tmp_path / "device"))
    return Secure(gw, pairing, lan)


class Sensor:
    """A LAN sensor publishing to the task's trigger every 50 ms, and a subscriber on what
    the task publishes, with the time each message arrived."""

    def __init__(self, address: BrokerAddress, base: str) -> None:
        self.base = base
        self.bus = Bus(address)
        self.bus.subscribe(f"{base}/out")
        self.heard: queue.Queue[tuple[float, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sensor")

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.bus.publish(f"{self.base}/in", b"x")
            for topic, payload in self.bus.drain(quiet_s=0.0):
                if topic == f"{self.base}/out":
                    self.heard.put((time.monotonic(), payload))

    def __enter__(self) -> Sensor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.bus.close()

    def since(self, t: float) -> list[bytes]:
        got = []
        while not self.heard.empty():
            at, payload = self.heard.get()
            if at > t:
                got.append(payload)
        return got

    def wait_for_output(self, timeout_s: float = 15.0) -> bytes:
        return self.heard.get(timeout=timeout_s)[1]


@pytest.fixture
def base() -> str:
    return f"test/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def tasks_dir(examples: Path) -> Path:
    path = examples / "tasks"
    if not (path / "counter.wasm").exists():
        subprocess.run(
            [sys.executable, str(Path(__file__).parent.parent / "scripts" / "build_examples.py")],
            check=True,
        )
    return path


def test_a_revoked_devices_tasks_publish_nothing_after_the_revoke_returns(
    secure: Secure, tmp_path: Path, tasks_dir: Path, base: str
) -> None:
    secure.pair(tmp_path / "device")
    with Client(str(secure.lan), placement="edge", timeout_s=10) as client:
        info = client.install_task(
            tasks_dir / "counter.wasm",
            "counter",
            on=[f"{base}/in"],
            may_publish=[f"{base}/out"],
            config={"out_topic": f"{base}/out"},
        )
    assert info.owner == DEVICE
    with Sensor(secure.gw.listen, base) as sensor:
        sensor.wait_for_output()  # the task runs and publishes
        revoked = secure.admin("devices", "revoke", DEVICE)
        returned = time.monotonic()
        assert revoked.returncode == 0, revoked.stderr
        time.sleep(3)  # 60 more sensor events
        # What left the gateway before the revoke returned may still be on its way: 0.25 s.
        after = sensor.since(returned + 0.25)
    assert after == [], f"the revoked device's task published {after}"
    shown = secure.task(info.task_id)
    assert shown["state"] == "suspended"
    assert "revoked" in shown["reason"]
    suspended = secure.audit("--kind", "task_suspend")
    assert [(e["target"], e["decision"]) for e in suspended] == [(info.task_id, "allowed")]

    # Not resumed behind the owner's back while the device is still revoked.
    refused = secure.admin("tasks", "resume", info.task_id)
    assert refused.returncode == 1
    assert "revoked" in refused.stderr
    assert secure.task(info.task_id)["state"] == "suspended"


def test_a_device_paired_again_resumes_its_task_with_its_state(
    secure: Secure, tmp_path: Path, tasks_dir: Path, base: str
) -> None:
    secure.pair(tmp_path / "device")
    with Client(str(secure.lan), placement="edge", timeout_s=10) as client:
        info = client.install_task(
            tasks_dir / "counter.wasm",
            "counter",
            on=[f"{base}/in"],
            may_publish=[f"{base}/out"],
            config={"out_topic": f"{base}/out"},
        )
    with Sensor(secure.gw.listen, base) as sensor:
        before = int(sensor.wait_for_output())
        assert secure.admin("devices", "revoke", DEVICE).returncode == 0
        time.sleep(0.5)
        sensor.since(0)  # forget what came before
        secure.pair(tmp_path / "device")  # the same id, again
        with Client(str(secure.lan), placement="edge", timeout_s=10) as client:
            assert client.task(info.task_id, "resume").state == "running"
        after = int(sensor.wait_for_output())
    # Its checkpointed count went on; the events while it was suspended were not delivered.
    assert after > before
    assert secure.audit("--kind", "task_resume")[-1]["decision"] == "allowed"


def test_the_box_owner_can_cancel_a_revoked_devices_task(
    secure: Secure, tmp_path: Path, tasks_dir: Path, base: str
) -> None:
    secure.pair(tmp_path / "device")
    with Client(str(secure.lan), placement="edge", timeout_s=10) as client:
        info = client.install_task(
            tasks_dir / "counter.wasm", "counter", on=[f"{base}/in"], may_publish=[f"{base}/out"]
        )
    assert secure.admin("devices", "revoke", DEVICE).returncode == 0
    assert secure.task(info.task_id)["state"] == "suspended"
    cancelled = secure.admin("tasks", "cancel", info.task_id)
    assert cancelled.returncode == 0, cancelled.stderr
    listing = json.loads(secure.admin("tasks", "list", "--json").stdout)
    assert info.task_id not in {t["task_id"] for t in listing}
    secure.pair(tmp_path / "device")
    with (
        Client(str(secure.lan), placement="edge", timeout_s=10) as client,
        pytest.raises(JobError) as gone,
    ):
        client.task(info.task_id)
    assert gone.value.code is ErrorCode.FORBIDDEN  # gone with its state
