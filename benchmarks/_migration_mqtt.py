"""Part 4 of benchmarks/migration.py: a run leaving a real gateway for its device over MQTT.

Two real gateways (``hearth-gateway run``, each with its own managed Mosquitto on 127.0.0.1), one
that pre-copies a leaving run (``[migration] precopy_over_mib = 16``) and one that stops and
copies (``= 0``); the device is an SDK client in this process. Each trial starts dirtymem with
64 MiB on a gateway (``where="edge"``), lets it run, then moves it home
(``run.migrate("local")``): pre-copy rounds over MQTT with flow control, then the delta
(docs/migration.md §8.4), or the whole snapshot at once. The run finishes on the device and its
output is checked against a plain run's. Downtime: the run stopping in the gateway's worker
(``run_moved`` ``paused_at``) to its rewind reaching that point on the device (``resumed_at``),
the same CLOCK_MONOTONIC. Trials of the two modes are taken in turn.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from hearth.migration import LinkPolicy
from hearth.runtime.limits import WasmLimits
from hearth.runtime.wasm import WasmRuntime
from hearth.transport import BrokerAddress
from testkit.examples import ensure_examples
from testkit.gateway import GatewayProcess
from testkit.net import LOOPBACK, free_port
from testkit.wait import wait_until

__all__ = ["MQTT_ARGS", "MqttTrial", "measure_mqtt"]

log = logging.getLogger("bench.migration")

# dirtymem with 64 MiB, as in part 3, with steps enough to outlast a slow pre-copy.
MQTT_ARGS = ("64", "40000", "4", "32")
FUEL = 10**13
LIMITS = WasmLimits(fuel=FUEL, output_bytes=64 << 20, memory_bytes=256 << 20)
WARM_S = 1.5  # on the gateway before it is moved: memory filled, steps under way
MODES = {"precopy": 16.0, "stop": 0.0}  # [migration] precopy_over_mib of each gateway


@dataclass
class MqttTrial:
    mode: str
    downtime_ms: float
    rounds: int  # pre-copy rounds applied by the device
    round_bytes: int
    migration_ms: float  # migrate() asked -> running on the device


def _policy(work: Path, mode: str) -> Path:
    path = work / f"{mode}.toml"
    path.write_text(
        f"[wasm]\nfuel = {FUEL}\noutput_bytes = {64 << 20}\n"
        f"[migration]\nprecopy_over_mib = {MODES[mode]}\n"
    )
    return path


def _once(gateway: GatewayProcess, wasm: bytes, mode: str, reference: bytes) -> MqttTrial:
    with gateway.client(placement="auto", timeout_s=30) as device:
        run = device.start_wasm(
            wasm,
            args=MQTT_ARGS,
            where="edge",
            limits=LIMITS,
            checkpoint_every_s=3600,  # what is measured is the move, not a checkpoint's traffic
            link=LinkPolicy(every_s=0),
        )
        if not wait_until(lambda: run.where == gateway.gateway_id, timeout_s=30):
            raise RuntimeError("the run did not start on the gateway")
        time.sleep(WARM_S)
        asked = time.monotonic()
        if run.migrate("local", wait_s=120) != "local":
            raise RuntimeError(f"{mode}: the run finished before it moved: raise its steps")
        outcome = run.result(600)
    if outcome.stdout != reference or [h.where for h in outcome.hops][-1] != "local":
        raise RuntimeError(f"{mode}: the moved run's output differs from the plain run's")
    return MqttTrial(
        mode=mode,
        downtime_ms=(run.resumed_at - run.paused_at) * 1e3,
        rounds=run.precopy_rounds,
        round_bytes=run.precopy_bytes,
        migration_ms=(run.resumed_at - asked) * 1e3,
    )


def measure_mqtt(trials: int, work: Path) -> dict[str, list[MqttTrial]]:
    directory = ensure_examples("wasm/dirtymem.migratable.wasm") / "wasm"
    wasm = (directory / "dirtymem.migratable.wasm").read_bytes()
    plain_wasm = (directory / "dirtymem.wasm").read_bytes()
    plain = WasmRuntime(wasi_nn=None)
    try:
        sha = hashlib.sha256(plain_wasm).hexdigest()
        reference = plain.run(sha, args=MQTT_ARGS, wasm=plain_wasm, limits=LIMITS).stdout
    finally:
        plain.close()
    gateways = {
        mode: GatewayProcess(
            BrokerAddress(LOOPBACK, free_port()),
            work / f"gw-{mode}",
            managed=True,
            workers=1,
            extra_args=["--policy", str(_policy(work, mode))],
        )
        for mode in MODES
    }
    results: dict[str, list[MqttTrial]] = {mode: [] for mode in MODES}
    try:
        for gateway in gateways.values():
            gateway.state_dir.mkdir(parents=True, exist_ok=True)
            gateway.start()
        for i in range(trials):
            for mode in ("precopy", "stop") if i % 2 == 0 else ("stop", "precopy"):
                trial = _once(gateways[mode], wasm, mode, reference)
                log.info(
                    "mqtt %s: downtime %.1f ms, %d rounds %.1f MiB, in all %.0f ms",
                    mode,
                    trial.downtime_ms,
                    trial.rounds,
                    trial.round_bytes / 2**20,
                    trial.migration_ms,
                )
                results[mode].append(trial)
    finally:
        for gateway in gateways.values():
            gateway.close(grace_s=5)
    return results
