"""A saturated gateway sends its runs on under the placement rules of jobs (placement.py,
docs/migration.md §8.2): a public run goes to its upstream gateway, through its device, and
finishes there with the output of a run that never moved; a private one comes back to its
device, never upstream, and the refusal is in the audit table. Two real gateways on
127.0.0.1, each with its own Mosquitto."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import GatewayProcess, wait_until
from hearth.runtime.limits import WasmLimits
from hearth.runtime.wasm import WasmRuntime

pytestmark = pytest.mark.slow

FUEL = 40_000_000_000
LIMITS = WasmLimits(fuel=FUEL)
ROUNDS = "4800"  # ~2 s of work over STDIN_BYTES here
STDIN_BYTES = 256 * 1024


def _audit(state_dir: Path) -> list[dict[str, Any]]:
    argv = [sys.executable, "-m", "hearth_gateway.cli", "audit", "--json"]
    argv += ["--limit", "10000", "--state-dir", str(state_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_saturated_gateway_sends_a_public_run_upstream_and_a_private_one_home(
    make_gateway: Callable[..., GatewayProcess], examples: Path, tmp_path: Path
) -> None:
    migratable = examples / "wasm" / "hashchain.migratable.wasm"
    if not migratable.exists():
        pytest.skip("no instrumented examples: Binaryen's wasm-opt is not installed")
    plain = (examples / "wasm" / "hashchain.wasm").read_bytes()
    echo = examples / "wasm" / "echo.wasm"
    policy = tmp_path / "saturates.toml"
    # Two jobs waiting behind a busy worker: saturated, past the policy.
    policy.write_text(f"[wasm]\nfuel = {FUEL}\n[migration]\nevict_when_queue_over = 1\n")
    peer = make_gateway("--policy", str(policy), managed=True)
    upstream = ("--upstream", f"mqtt://{peer.address}")
    home = make_gateway("--workers", "1", "--policy", str(policy), *upstream, managed=True)
    assert wait_until(lambda: home.snapshot().upstream_connected, 15), home.log()
    stdin = random.Random(10).randbytes(STDIN_BYTES)
    reference = WasmRuntime(wasi_nn=None).run(
        hashlib.sha256(plain).hexdigest(), stdin=stdin, args=[ROUNDS], wasm=plain, limits=LIMITS
    )
    outcomes = {}
    with home.client(placement="auto") as device:
        for data_class in ("public", "private"):
            run = device.start_wasm(
                migratable.read_bytes(),
                stdin=stdin,
                args=[ROUNDS],
                where="edge",
                data_class=data_class,  # type: ignore[arg-type]
                limits=LIMITS,
            )
            assert wait_until(lambda run=run: run.where == home.gateway_id, timeout_s=20)
            time.sleep(0.3)
            # Work that cannot move (private jobs stay where they are sent) fills the queue.
            waiting = [device.run_wasm_async(echo, b"x", where="edge") for _ in range(3)]
            outcomes[data_class] = run.result(120)
            assert [w.result(60).stdout for w in waiting] == [b"x"] * 3
    for outcome in outcomes.values():
        assert (outcome.exit_code, outcome.stdout) == (reference.exit_code, reference.stdout)
    public, private = outcomes["public"], outcomes["private"]
    assert [h.where for h in public.hops] == [home.gateway_id, peer.gateway_id]
    assert public.hops[-1].reason == f"gateway overloaded: to its upstream {peer.address}"
    assert [h.where for h in private.hops] == [home.gateway_id, "local"]
    assert private.hops[-1].reason == "gateway overloaded"
    refused = [
        r
        for r in _audit(home.state_dir)
        if r["decision"] == "refused" and "never upstream" in r["reason"]
    ]
    assert len(refused) == 1
    assert refused[0]["action"] == "place:private"


def test_decide_run_move_follows_the_rules_of_jobs() -> None:
    from hearth.errors import ErrorCode
    from hearth_gateway.placement import Action, UpstreamState, decide_run_move

    ready = UpstreamState(target="10.0.0.2:1883", ready=True)
    busy = UpstreamState(target="10.0.0.2:1883", ready=False)
    public = decide_run_move(data_class="public", tier="home", upstream=ready)
    assert (public.action, public.target) == (Action.UPSTREAM, "10.0.0.2:1883")
    private = decide_run_move(data_class="private", tier="home", upstream=ready)
    assert (private.action, private.code) == (Action.DENY, ErrorCode.POLICY_DENIED)
    assert decide_run_move(data_class="public", tier="home", upstream=busy).action is Action.QUEUE
    assert decide_run_move(data_class="public", tier="cloud", upstream=ready).action is Action.QUEUE
    none = decide_run_move(data_class="private", tier="home", upstream=UpstreamState())
    assert none.action is Action.QUEUE
