"""A stand-in for the home's own broker (Home Assistant's Mosquitto add-on): a second Mosquitto
with its sessions saved to disk after every change, so a SIGKILL loses no subscription, and
optionally a password file (anonymous clients then refused), in a network namespace if asked.
Its clients in the tests speak MQTT 3.1.1, as zigbee2mqtt and Tasmota do."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hearth.transport import BrokerAddress, set_nodelay
from hearth_gateway.acl import password_line
from hearth_gateway.broker import find_mosquitto
from testkit.net import LOOPBACK, free_port, listening
from testkit.procs import tail

__all__ = ["HomeBroker", "HomeDevice"]


class HomeBroker:
    """``start()`` (again after ``kill()``: same port, same saved sessions), ``kill()``
    (SIGKILL), ``close()`` (idempotent). ``users``: name -> password; none: anonymous."""

    def __init__(
        self,
        work_dir: Path,
        *,
        host: str = LOOPBACK,
        port: int | None = None,
        users: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> None:
        self._dir = work_dir / "home-broker"
        self.address = BrokerAddress(host, port or free_port())
        self._users = users
        self._netns = netns
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = self._dir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://{self.address}"

    def _config(self) -> str:
        lines = [
            *(["user root"] if os.geteuid() == 0 else []),
            "per_listener_settings false",
            f"listener {self.address.port} {self.address.host}",
            "set_tcp_nodelay true",
            "persistence true",
            f"persistence_location {self._dir}/",
            # Saved after every change (the add-on saves less often; a test SIGKILLs it).
            "autosave_on_changes true",
            "autosave_interval 1",
            "max_queued_messages 100000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if self._users is None:
            lines.append("allow_anonymous true")
        else:
            passwords = self._dir / "passwords"
            passwords.write_text("".join(password_line(u, p) for u, p in self._users.items()))
            passwords.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        return "\n".join([*lines, ""])

    def start(self, timeout_s: float = 10.0) -> Self:
        self._dir.mkdir(parents=True, exist_ok=True)
        conf = self._dir / "mosquitto.conf"
        conf.write_text(self._config())
        argv = [find_mosquitto(), "-c", str(conf)]
        if self._netns:
            argv = ["ip", "netns", "exec", self._netns, *argv]
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if self._listening():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"home broker did not start:\n{tail(self.log_path)}")

    def _listening(self) -> bool:
        if self._netns is None:
            return listening(self.address.port)
        out = subprocess.run(
            ["ip", "netns", "exec", self._netns, "ss", "-Hltn", f"sport = :{self.address.port}"],
            capture_output=True,
            text=True,
            check=False,
        )
        return bool(out.stdout.strip())

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled plug."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()


class HomeDevice:
    """A zigbee2mqtt-like client of the home broker: MQTT 3.1.1, a persistent session, QoS 1,
    reconnecting by itself (paho's thread) and sending what it published meanwhile. Records
    what it receives with the time.monotonic() it arrived. ``close()`` is idempotent."""

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        *,
        subscribe: tuple[str, ...] = (),
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.received: queue.Queue[tuple[float, str, bytes]] = queue.Queue()
        self.connected = threading.Event()
        self._filters = subscribe
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        client.on_socket_open = set_nodelay
        client.reconnect_delay_set(1, 1)
        if username is not None:
            client.username_pw_set(username, password)

        def on_connect(c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
            if getattr(reason, "is_failure", False):
                return
            for topic_filter in self._filters:
                c.subscribe(topic_filter, qos=1)
            self.connected.set()

        def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
            self.received.put((time.monotonic(), msg.topic, bytes(msg.payload)))

        def on_disconnect(*_args: object) -> None:
            self.connected.clear()

        client.on_connect = on_connect
        client.on_message = on_message
        client.on_disconnect = on_disconnect
        self._client: mqtt.Client | None = client
        client.connect_async(address.host, address.port, keepalive=5)
        client.loop_start()
        if not self.connected.wait(10):
            self.close()
            raise RuntimeError(f"{client_id} could not connect to {address}")

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1) -> None:
        """Returns at once; paho sends it now or after the next reconnect."""
        data = payload.encode() if isinstance(payload, str) else payload
        assert self._client is not None, "closed"
        self._client.publish(topic, data, qos=qos)

    def expect(self, topic: str, timeout_s: float = 10.0) -> tuple[float, bytes]:
        """The next message on ``topic`` (others are dropped): (arrival time, payload)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                at, got, payload = self.received.get(timeout=left)
            except queue.Empty:
                break
            if got == topic:
                return at, payload
        raise TimeoutError(f"nothing on {topic} within {timeout_s} s")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.disconnect()
        client.loop_stop()
