"""Live migration on link degradation (docs/migration.md §8.1): a run on a gateway comes back
to its device by itself when the device's measured link to the gateway degrades past its
LinkPolicy, and the result's hops say why. The link is real: the device reaches the broker
through a TCP relay on 127.0.0.1 that the test slows down, as a congested Wi-Fi link would be.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import GatewayProcess, wait_until
from hearth import Client
from hearth.migration import LinkPolicy, LinkWatch
from hearth.runtime.limits import WasmLimits
from hearth.runtime.wasm import WasmRuntime
from testkit.net import LOOPBACK

pytestmark = pytest.mark.slow

FUEL = 100_000_000_000
LIMITS = WasmLimits(fuel=FUEL)
ROUNDS = "9600"  # ~4 s of work over STDIN_BYTES here: long enough to be caught on the gateway
STDIN_BYTES = 256 * 1024


class SlowLink:
    """A TCP relay to ``target`` whose every forwarded piece waits ``delay_s`` first (in each
    direction): a link whose round trip grows by twice that."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self.delay_s = 0.0
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            far = socket.create_connection(self._target)
            self._sockets += [near, far]
            for src, dst in ((near, far), (far, near)):
                pump = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                pump.start()
                self._threads.append(pump)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if self.delay_s:
                    time.sleep(self.delay_s)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)


def test_a_degraded_link_brings_the_run_home_with_the_reason_in_its_hops(
    make_gateway: Callable[..., GatewayProcess], examples: Path, tmp_path: Path
) -> None:
    migratable = examples / "wasm" / "hashchain.migratable.wasm"
    if not migratable.exists():
        pytest.skip("no instrumented examples: Binaryen's wasm-opt is not installed")
    plain = (examples / "wasm" / "hashchain.wasm").read_bytes()
    policy = tmp_path / "long-runs.toml"
    policy.write_text(f"[wasm]\nfuel = {FUEL}\n")
    gw = make_gateway("--policy", str(policy), managed=True)
    link = SlowLink((gw.listen.host, gw.listen.port))
    stdin = random.Random(8).randbytes(STDIN_BYTES)
    reference = WasmRuntime(wasi_nn=None).run(
        hashlib.sha256(plain).hexdigest(), stdin=stdin, args=[ROUNDS], wasm=plain, limits=LIMITS
    )
    watch = LinkPolicy(every_s=0.1, window=3, max_rtt_ms=150.0, timeout_s=1.0)
    try:
        with Client(f"{LOOPBACK}:{link.port}", placement="auto", timeout_s=20) as device:
            run = device.start_wasm(
                migratable.read_bytes(),
                stdin=stdin,
                args=[ROUNDS],
                where="edge",
                limits=LIMITS,
                link=watch,
            )
            assert wait_until(lambda: run.where == gw.gateway_id, timeout_s=20)
            time.sleep(0.5)  # healthy pings: the run stays
            assert run.where == gw.gateway_id
            link.delay_s = 0.15  # each way: round trips of 300 ms and more
            outcome = run.result(120)
    finally:
        link.close()
    assert (outcome.exit_code, outcome.stdout) == (reference.exit_code, reference.stdout)
    assert [h.where for h in outcome.hops] == [gw.gateway_id, "local"]
    assert outcome.hops[-1].reason.startswith("link degraded: median round trip")


def test_the_link_verdict_needs_a_full_window_and_counts_losses() -> None:
    policy = LinkPolicy(window=4, max_rtt_ms=100.0, max_loss=0.5)
    watch = LinkWatch(policy)
    assert [watch.add(x) for x in (500.0, 500.0, 500.0)] == [None, None, None]
    assert (watch.add(20.0) or "").startswith("link degraded: median round trip 500 ms")
    healthy = LinkWatch(policy)
    assert [healthy.add(x) for x in (20.0, 900.0, 30.0, 25.0, 40.0)] == [None] * 5
    lossy = LinkWatch(policy)
    assert [lossy.add(x) for x in (None, 20.0, None)] == [None] * 3
    assert lossy.add(None) == "link degraded: 3 of the last 4 pings unanswered"
    # Half lost is not more than half: the answered ones decide.
    even = LinkWatch(policy)
    assert [even.add(x) for x in (None, 20.0, None, 30.0)] == [None] * 4
