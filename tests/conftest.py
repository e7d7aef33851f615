"""Fixtures against real parts: a Mosquitto on a free loopback port, real gateway daemons as
subprocesses, the example modules built by scripts/build_examples.py. Nothing leaves loopback.

The parts themselves are testkit's (shared with the benchmarks); these fixtures only own them
for a test or a session. The names imported from testkit stay importable from here for tests
that take them from conftest.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hearth.errors import HearthError
from hearth.transport import BrokerAddress
from testkit.examples import EXAMPLES, ensure_examples
from testkit.examples import REPO_ROOT as ROOT
from testkit.gateway import GatewayProcess
from testkit.mosquitto import Mosquitto
from testkit.net import free_port, wait_for_port
from testkit.wait import wait_until

Broker = Mosquitto  # the name this fixture's type had before testkit

# Well above the gateway's own message limit (16 MiB by default): a message too big for a
# gateway reaches that gateway's policy, which answers it, instead of the broker dropping it.
_MAX_PACKET_BYTES = 64 * 1024 * 1024


@pytest.fixture(scope="session")
def examples() -> Path:
    """The example modules and model, built once per session if missing."""
    return ensure_examples("models/digits.onnx", "wasm/*.wasm")


@pytest.fixture(scope="session")
def wasm(examples: Path) -> dict[str, Path]:
    return {p.stem: p for p in (examples / "wasm").glob("*.wasm")}


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One real Mosquitto for the session; tests isolate themselves by unique gateway and
    client ids (every topic carries them)."""
    with Mosquitto(tmp_path_factory.mktemp("broker"), max_packet_bytes=_MAX_PACKET_BYTES) as b:
        yield b


@pytest.fixture
def make_gateway(tmp_path: Path, broker: Mosquitto) -> Iterator[Callable[..., GatewayProcess]]:
    """``make_gateway(*extra_args, managed=False, start=True)``: a gateway (2 workers) on the
    session's broker, or with a managed broker of its own on a free port; SIGKILLed with
    everything it started at the end of the test."""
    made: list[GatewayProcess] = []

    def make(*extra: str, managed: bool = False, start: bool = True) -> GatewayProcess:
        gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
        listen = BrokerAddress("127.0.0.1", free_port()) if managed else broker.address
        gw = GatewayProcess(
            listen,
            tmp_path / gateway_id,
            gateway_id=gateway_id,
            managed=managed,
            workers=2,
            extra_args=extra,
            supervised=False,  # tests SIGKILL and inspect the daemon itself
        )
        gw.state_dir.mkdir(parents=True)
        made.append(gw)
        if start:
            gw.start()
        return gw

    yield make
    for gw in made:
        gw.close(grace_s=0)


@pytest.fixture
def gateway(make_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    return make_gateway()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads behind (a client or runtime not closed)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith("asyncio")
        ]
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"test leaked threads: {[t.name for t in leaked]}")


__all__ = [
    "EXAMPLES",
    "ROOT",
    "Broker",
    "GatewayProcess",
    "HearthError",
    "free_port",
    "wait_for_port",
    "wait_until",
]
