"""Pre-copy on the device <-> gateway MQTT path (docs/migration.md §8.4): a run with more
memory than [migration] precopy_over_mib, asked to leave a gateway, sends its memory to the
device in run_round messages while it goes on (rounds larger than a piece in run_chunk
pieces, all of it flow-controlled by the device's acknowledgements), then stops for a delta;
the device resumes it on the instance the rounds filled, with the output of a run that never
moved, and its hop reports the rounds, their bytes and the downtime. Checkpoints of 24 MiB
reach the device the same way. Against a real gateway on 127.0.0.1."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import GatewayProcess, wait_until
from hearth.migration import LinkPolicy
from hearth.runtime.limits import WasmLimits
from hearth.runtime.wasm import WasmRuntime

pytestmark = pytest.mark.slow

FUEL = 200_000_000_000
LIMITS = WasmLimits(fuel=FUEL)
# dirtymem: 24 MiB of incompressible data, then 6000 steps dirtying it (4 pages rewritten 128
# times over each): seconds of work on a quiet machine, so that the run is still going when its
# first checkpoint has come and it is asked to leave. (With 3000 quick steps, as before, it
# finished on the gateway in about a second, before any checkpoint was due.)
ARGS = ["24", "6000", "4", "128"]


@pytest.mark.parametrize("precopy", [True, False], ids=["precopy", "stop-and-copy"])
def test_a_large_run_leaves_the_gateway_by_precopy_over_mqtt_byte_identical(
    make_gateway: Callable[..., GatewayProcess], examples: Path, tmp_path: Path, precopy: bool
) -> None:
    migratable = examples / "wasm" / "dirtymem.migratable.wasm"
    if not migratable.exists():
        pytest.skip("no instrumented examples: Binaryen's wasm-opt is not installed")
    plain = (examples / "wasm" / "dirtymem.wasm").read_bytes()
    policy = tmp_path / "precopy.toml"
    over = 16.0 if precopy else 0.0
    policy.write_text(f"[wasm]\nfuel = {FUEL}\n[migration]\nprecopy_over_mib = {over}\n")
    gw = make_gateway("--policy", str(policy), managed=True)
    reference = WasmRuntime(wasi_nn=None).run(
        hashlib.sha256(plain).hexdigest(), args=ARGS, wasm=plain, limits=LIMITS
    )
    with gw.client(placement="auto", timeout_s=30) as device:
        run = device.start_wasm(
            migratable.read_bytes(),
            args=ARGS,
            where="edge",
            limits=LIMITS,
            checkpoint_every_s=2,
            # Its 24 MiB checkpoints keep the gateway's loop busy: pings would be slow.
            link=LinkPolicy(every_s=0),
        )
        assert wait_until(lambda: run.where == gw.gateway_id, timeout_s=20)
        # Its memory filled and its steps under way on the gateway: the first checkpoint comes
        # at the first step (filling memory makes no WASI call).
        assert wait_until(lambda: run.checkpoints >= 1, timeout_s=60)
        time.sleep(0.3)
        assert run.migrate("local", wait_s=60) == "local"
        outcome = run.result(180)
    assert (outcome.exit_code, outcome.stdout) == (reference.exit_code, reference.stdout)
    assert [h.where for h in outcome.hops] == [gw.gateway_id, "local"]
    downtime_ms = (run.resumed_at - run.paused_at) * 1e3
    arrival = outcome.hops[-1]
    if precopy:
        assert run.precopy_rounds >= 2, outcome.hops
        assert run.precopy_bytes >= 24 << 20  # round 0 alone is the whole memory
        assert (arrival.precopy_rounds, arrival.precopy_bytes) == (
            run.precopy_rounds,
            run.precopy_bytes,
        )
        assert arrival.downtime_ms == pytest.approx(downtime_ms)
    else:
        assert run.precopy_rounds == 0
        assert arrival.precopy_rounds == 0
    print(
        f"{'pre-copy' if precopy else 'stop-and-copy'}: {run.precopy_rounds} rounds, "
        f"{run.precopy_bytes / 2**20:.1f} MiB of rounds, downtime {downtime_ms:.0f} ms"
    )
    assert 0 < downtime_ms < 60_000
