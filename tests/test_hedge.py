"""placement="hedge": a call runs on the device and on the gateway at once, and the first answer
wins, and the other is cancelled (docs/migration.md §10). Against a real gateway on
127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import GatewayProcess
from hearth.errors import ErrorCode, JobError
from hearth.migration import MigratableRun
from hearth.runtime.asyncify import wasm_opt_path
from hearth.runtime.wasm import WasmRuntime


def test_a_hedged_call_answers_from_either_side_with_the_same_result(
    gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    with gateway.client(placement="hedge") as client:
        run = client.run_wasm(wasm["echo"], b"hedged", ["a", "b"])
        assert run.stdout == b"hedgeda b\n"
        assert run.reason.startswith("hedge: ")
        assert run.where in ("edge", "local")
        assert client.stats.hedged == 1
        future = client.run_wasm_async(wasm["echo"], b"async", [])
        assert future.result(30).stdout == b"async"
        assert client.stats.hedged == 2


def test_a_stalled_gateway_does_not_hold_a_hedged_call_up(
    gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    pid = gateway.daemon_pid()
    with gateway.client(placement="hedge") as client:
        client.run_wasm(wasm["echo"], b"warm", [])  # the module is on both sides now
        os.kill(pid, signal.SIGSTOP)
        try:
            run = client.run_wasm(wasm["echo"], b"while the gateway is stopped", [])
        finally:
            os.kill(pid, signal.SIGCONT)
        assert run.stdout == b"while the gateway is stopped"
        assert run.where == "local"
        assert run.reason == "hedge: this device answered first"


def test_hedge_runs_here_alone_when_no_gateway_answers(wasm: dict[str, Path]) -> None:
    from hearth import Client

    with Client("127.0.0.1:1", placement="hedge", timeout_s=2) as client:
        run = client.run_wasm(wasm["echo"], b"alone", [])
    assert run.where == "local"
    assert run.stdout == b"alone"


# -- the loser is cancelled (hearth._hedge) -------------------------------------------------

# FNV rounds per 4 KiB chunk, and input: ~0.3 s of work here (1.4e9 units of fuel), within
# the default fuel of a call on this device (2e9).
HASHCHAIN_ROUNDS = "1400"
STDIN_BYTES = 96 * 1024


@pytest.fixture(scope="module")
def long_call(examples: Path) -> tuple[Path, bytes, bytes]:
    """hashchain, its input, and the output of a run that nothing interrupted."""
    module = examples / "wasm" / "hashchain.wasm"
    if wasm_opt_path() is None:
        pytest.skip("a cancellable hedge needs Binaryen's wasm-opt")
    stdin = random.Random(7).randbytes(STDIN_BYTES)
    plain = WasmRuntime(wasi_nn=None)
    try:
        sha = hashlib.sha256(module.read_bytes()).hexdigest()
        ref = plain.run(sha, stdin=stdin, args=[HASHCHAIN_ROUNDS], path=module)
    finally:
        plain.close()
    return module, stdin, ref.stdout


def _cancelled(loser: MigratableRun) -> JobError:
    with pytest.raises(JobError) as ended:
        loser.result(30)
    assert ended.value.code is ErrorCode.CANCELLED
    return ended.value


def test_a_hedge_cancels_the_gateway_half_when_the_device_answers_first_and_frees_its_worker(
    make_gateway: Callable[..., GatewayProcess], long_call: tuple[Path, bytes, bytes]
) -> None:
    module, stdin, expected = long_call
    gw = make_gateway("--workers", "1")
    with gw.client(placement="hedge") as client:
        client.run_wasm(module, b"warm", ["1"])  # migratable form made, uploaded, compiled
        (worker,) = gw.snapshot().worker_pids
        # The gateway's only worker stops: the device's half answers first.
        os.kill(worker, signal.SIGSTOP)
        try:
            run = client.run_wasm(module, stdin, [HASHCHAIN_ROUNDS])
            loser = client._hedger.losers[-1]
        finally:
            os.kill(worker, signal.SIGCONT)
        assert run.where == "local"
        assert run.stdout == expected
        # The gateway answers its half "cancelled" (its word, not the device's: a half that ran
        # to its end would be answered run_result), once its worker has let go of it ...
        assert _cancelled(loser).where == "edge"
        # ... so the worker, the gateway's only one, takes the next job.
        assert client.run_wasm(module, b"next", ["1"], where="edge").where == "edge"


# The device of the next test, in a process of its own that the test can stop: it sends one
# hedged call when told to and prints, as JSON, where the answer came from and how its loser
# ended.
_DEVICE = """
import json, sys
from hearth import Client
module, rounds, data = sys.argv[2], sys.argv[3], open(sys.argv[4], "rb").read()
with Client(sys.argv[1], placement="hedge") as client:
    client.run_wasm(module, b"warm", ["1"])
    print("ready", flush=True)
    sys.stdin.readline()
    run = client.run_wasm(module, data, [rounds])
    loser = client._hedger.losers[-1]
    try:
        loser.result(30)
        ended = "finished"
    except Exception as exc:
        ended = f"{getattr(exc, 'code', '')}"
    print(json.dumps({"where": run.where, "stdout": run.stdout.hex(), "loser": ended,
                      "loser_hops": [h.where for h in loser.hops]}), flush=True)
"""


def test_a_hedge_stops_the_device_half_when_the_gateway_answers_first(
    make_gateway: Callable[..., GatewayProcess],
    long_call: tuple[Path, bytes, bytes],
    tmp_path: Path,
) -> None:
    module, stdin, expected = long_call
    gw = make_gateway()
    data = tmp_path / "stdin"
    data.write_bytes(stdin)
    argv = [sys.executable, "-c", _DEVICE, gw.address, str(module), HASHCHAIN_ROUNDS, str(data)]
    tries = 3
    for _ in range(tries):
        device = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert device.stdout is not None
            assert device.stdin is not None
            assert device.stdout.readline().strip() == b"ready"
            device.stdin.write(b"go\n")
            device.stdin.flush()
            # Both halves are under way; the device stops (its half with it) while the
            # gateway's half finishes, and its answer is waiting when the device goes on.
            time.sleep(0.1)
            os.kill(device.pid, signal.SIGSTOP)
            time.sleep(1.5)
            os.kill(device.pid, signal.SIGCONT)
            out, _ = device.communicate(timeout=60)
        finally:
            device.kill()
            device.wait()
        report = json.loads(out)
        assert bytes.fromhex(report["stdout"]) == expected
        if report["where"] == "edge":
            break
        # The device's half won: the call had not reached the gateway before the stop.
    else:
        pytest.fail(f"the gateway's half never answered first in {tries} tries")
    # The half on the device stopped at its next migration point, cancelled.
    assert report["loser"] == "cancelled"
    assert report["loser_hops"] == ["local"]
