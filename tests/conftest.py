"""Fixtures against real parts: a Mosquitto on a free loopback port, real gateway daemons as
subprocesses, the example modules built by scripts/build_examples.py. Nothing leaves loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hearth.client import Client
from hearth.errors import HearthError
from hearth.transport import BrokerAddress
from hearth_gateway.broker import find_mosquitto, mosquitto_config
from hearth_gateway.status import StatusSnapshot, read_snapshot

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "build" / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@pytest.fixture(scope="session")
def examples() -> Path:
    """The example modules and model, built once per session if missing."""
    if not (EXAMPLES / "models" / "digits.onnx").exists() or not any(
        (EXAMPLES / "wasm").glob("*.wasm")
    ):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_examples.py")], check=True)
    return EXAMPLES


@pytest.fixture(scope="session")
def wasm(examples: Path) -> dict[str, Path]:
    return {p.stem: p for p in (examples / "wasm").glob("*.wasm")}


class Broker:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.address = BrokerAddress("127.0.0.1", self.port)
        data = tmp / "mosquitto"
        data.mkdir(parents=True, exist_ok=True)
        os.chmod(data, 0o777)  # mosquitto drops to its own user when started as root
        conf = tmp / "mosquitto.conf"
        conf.write_text(mosquitto_config(self.address, data, 64 * 1024 * 1024))
        self.log = (tmp / "mosquitto.log").open("wb")
        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.port)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One real Mosquitto for the session; tests isolate themselves by unique gateway and
    client ids (every topic carries them)."""
    b = Broker(tmp_path_factory.mktemp("broker"))
    yield b
    b.close()


@dataclass
class GatewayProcess:
    """A real `hearth-gateway run` daemon in a subprocess."""

    gateway_id: str
    state_dir: Path
    broker_url: str | None
    listen: BrokerAddress
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def address(self) -> str:
        return str(self.listen)

    def start(self, timeout_s: float = 30.0) -> None:
        argv = [
            sys.executable, "-m", "hearth_gateway.cli", "run",
            "--gateway-id", self.gateway_id,
            "--state-dir", str(self.state_dir),
            "--workers", "2",
        ]  # fmt: skip
        if self.broker_url:
            argv += ["--broker", self.broker_url]
        else:
            argv += ["--listen", str(self.listen)]
        argv += self.extra
        if "--mdns-interface" not in self.extra:
            argv.append("--no-mdns")
        self.log_path = self.state_dir.parent / f"{self.gateway_id}.log"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
            snap = read_snapshot(self.state_dir)
            if snap is not None and snap.state == "online" and snap.pid == self.proc.pid:
                return
            time.sleep(0.05)
        raise TimeoutError(f"gateway did not come up:\n{self.log()}")

    def snapshot(self) -> StatusSnapshot:
        snap = read_snapshot(self.state_dir)
        assert snap is not None
        return snap

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def client(self, **kwargs: object) -> Client:
        kwargs.setdefault("placement", "edge")
        kwargs.setdefault("timeout_s", 20.0)
        return Client(self.address, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def make_gateway(tmp_path: Path, broker: Broker) -> Iterator[callable]:  # type: ignore[valid-type]
    started: list[GatewayProcess] = []

    def make(*extra: str, managed: bool = False, start: bool = True) -> GatewayProcess:
        gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
        state = tmp_path / gateway_id / "state"
        state.mkdir(parents=True)
        if managed:
            listen = BrokerAddress("127.0.0.1", free_port())
            gw = GatewayProcess(gateway_id, state, None, listen, list(extra))
        else:
            gw = GatewayProcess(gateway_id, state, broker.url, broker.address, list(extra))
        if start:
            gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait(timeout=10)


@pytest.fixture
def gateway(make_gateway: callable) -> GatewayProcess:  # type: ignore[valid-type]
    return make_gateway()  # type: ignore[no-any-return]


def wait_until(predicate: callable, timeout_s: float = 10.0, step_s: float = 0.02) -> bool:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return bool(predicate())


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads behind (a client or runtime not closed)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        leaked = [
            t for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith("asyncio")
        ]  # fmt: skip
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"test leaked threads: {[t.name for t in leaked]}")


__all__ = ["Broker", "GatewayProcess", "HearthError", "free_port", "wait_for_port", "wait_until"]
