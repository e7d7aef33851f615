"""What migrating running WebAssembly costs: instrumentation overhead, snapshot sizes, downtime.

Parts 1-3 use no broker and no gateway: the runtime itself (hearth.runtime.migratable,
docs/migration.md); part 4 goes through a real gateway and broker. In one run:

1. overhead: each example's Asyncify-instrumented twin (build/examples/wasm/NAME.migratable.wasm)
   under MigratableRuntime, against the plain module under WasmRuntime (wasmtime's own WASI),
   same arguments and input; CPU time of the executing thread, median of N runs taken in turn,
   so that background load does not favour either. Also the instrumented module under
   WasmRuntime, which splits the cost between Asyncify's code and the Python WASI host. Target:
   migratable/plain <= 1.3 for every example;
2. snapshot size: each example paused half-way (by migration points), its snapshot file as
   sent (zlib level 1), against the body uncompressed and the memory it describes;
3. downtime: dirtymem keeps dirtying 64 MiB while printing progress; it is moved from this
   process to a target process (a subprocess) over a TCP socket on 127.0.0.1. Downtime is from
   the moment the run stops at a migration point at the source to the moment its rewind
   reaches that point at the target (``Run.paused_at`` to ``Run.resumed_at``: the same
   CLOCK_MONOTONIC in both processes). Pre-copy (rounds of changed chunks while the run goes
   on, then a delta) against stop-and-copy (pause, the whole snapshot, resume), trials taken in
   turn; memory travels uncompressed (zlib level 0) in both, as on loopback or a fast LAN.
   Each migrated run finishes at the target and its output is checked against a plain run's.
   Target: pre-copy downtime <= 50 ms;
4. mqtt: the same program, 64 MiB, moved from a real gateway to its device (an SDK client in
   this process) over MQTT on 127.0.0.1 (benchmarks/_migration_mqtt.py): pre-copy rounds with
   flow control then a delta, against a gateway that stops and copies, trials taken in turn;
   each run finishes on the device with a plain run's output. Target: pre-copy downtime
   <= 50 ms.

    .venv/bin/python benchmarks/migration.py            # tables
    .venv/bin/python benchmarks/migration.py --json     # one JSON line on stdout
    .venv/bin/python benchmarks/migration.py --runs 9 --trials 5
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import logging
import random
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    LOOPBACK,
    ensure_examples,
    print_table,
    run_and_report,
    setup_logging,
    verdict,
)
from _migration_mqtt import MQTT_ARGS, MqttTrial, measure_mqtt
from hearth.runtime.asyncify import wasm_opt_path
from hearth.runtime.limits import WasmLimits
from hearth.runtime.migratable import Finished, MigratableRuntime, Paused
from hearth.runtime.snapshot import (
    MemoryRound,
    Snapshot,
    decode_round,
    decode_snapshot,
    encode_round,
    encode_snapshot,
)
from hearth.runtime.wasm import WasmRuntime

log = logging.getLogger("bench.migration")

TARGET_OVERHEAD = 1.3  # migratable / plain CPU time, at most, per example
TARGET_DOWNTIME_MS = 50.0  # pre-copy, at most
DEFAULT_RUNS = 5
DEFAULT_TRIALS = 3
LIMITS = WasmLimits(fuel=10**13, output_bytes=64 << 20, memory_bytes=256 << 20)
# dirtymem: 64 MiB, then steps that each rewrite 4 random pages 32 times over (~16 KiB made
# dirty per step), printing a line per step; more steps than a slow machine gets through while
# the pre-copy rounds go on. The plain run to check against is as long.
DIRTY_ARGS = ("64", "12000", "4", "32")
DIRTY_WARM_POINTS = 200  # steps run at the source before it migrates
TARGET_POINTS = 200  # steps run at the target before it stops and reports its output
TRIAL_TIMEOUT_S = 120.0
PARTS = ("overhead", "downtime", "mqtt")  # overhead includes the snapshot sizes


@dataclass(frozen=True)
class Workload:
    name: str
    args: tuple[str, ...]
    stdin: bytes = b""


def workloads() -> list[Workload]:
    rng = random.Random(1)
    side = 2048
    return [
        Workload("hashchain", ("8",), rng.randbytes(2 << 20)),
        Workload(
            "imgfilter", ("edges",), b"P5\n%d %d\n255\n" % (side, side) + rng.randbytes(side**2)
        ),
        Workload("mandelbrot", ("640", "480", "1000")),
        Workload("primes", ("3000000",)),
    ]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Module:
    plain_sha: str
    sha: str
    path: Path


def load(plain: WasmRuntime, directory: Path, name: str) -> Module:
    plain_bytes = (directory / f"{name}.wasm").read_bytes()
    path = directory / f"{name}.migratable.wasm"
    migratable = path.read_bytes()
    module = Module(sha256(plain_bytes), sha256(migratable), path)
    plain.load(module.plain_sha, plain_bytes)
    plain.load(module.sha, migratable)
    return module


# -- 1 and 2: overhead and snapshot size --------------------------------------------------


@dataclass
class Overhead:
    plain_ms: float
    asyncify_ms: float  # the instrumented module under WasmRuntime
    migratable_ms: float
    points: int

    @property
    def ratio(self) -> float:
        return self.migratable_ms / self.plain_ms

    @property
    def asyncify_ratio(self) -> float:
        return self.asyncify_ms / self.plain_ms


def cpu_ms(call: Callable[[], object]) -> tuple[float, object]:
    started = time.thread_time()
    result = call()
    return (time.thread_time() - started) * 1e3, result


def measure_overhead(
    plain: WasmRuntime, mig: MigratableRuntime, module: Module, work: Workload, runs: int
) -> Overhead:
    plain_ms, asyncify_ms, mig_ms = [], [], []
    points = 0
    reference = plain.run(module.plain_sha, args=work.args, stdin=work.stdin, limits=LIMITS)
    for _ in range(runs):
        ms, _ = cpu_ms(
            lambda: plain.run(module.plain_sha, args=work.args, stdin=work.stdin, limits=LIMITS)
        )
        plain_ms.append(ms)
        ms, _ = cpu_ms(
            lambda: plain.run(module.sha, args=work.args, stdin=work.stdin, limits=LIMITS)
        )
        asyncify_ms.append(ms)
        run = mig.start(module.sha, args=work.args, stdin=work.stdin, limits=LIMITS)
        ms, result = cpu_ms(run.execute)
        mig_ms.append(ms)
        if not isinstance(result, Finished) or result.stdout != reference.stdout:
            raise RuntimeError(f"{work.name}: the migratable run's output differs")
        points = run.migration_points
    return Overhead(
        statistics.median(plain_ms),
        statistics.median(asyncify_ms),
        statistics.median(mig_ms),
        points,
    )


@dataclass
class SnapshotSize:
    file_bytes: int  # zlib level 1, as sent
    body_bytes: int  # MessagePack, uncompressed
    memory_bytes: int  # the linear memory it stands for
    chunks: int


def measure_snapshot(
    mig: MigratableRuntime, module: Module, work: Workload, points: int
) -> SnapshotSize:
    run = mig.start(module.sha, args=work.args, stdin=work.stdin, limits=LIMITS)
    half = max(1, points // 2)
    run.on_migration_point = lambda r: r.pause() if r.migration_points == half else None
    paused = run.execute()
    if not isinstance(paused, Paused):
        raise RuntimeError(f"{work.name} did not stop at migration point {half}")
    snap = paused.snapshot
    return SnapshotSize(
        file_bytes=len(encode_snapshot(snap)),
        body_bytes=len(encode_snapshot(snap, level=0)),
        memory_bytes=snap.memory_pages * 65536,
        chunks=len(snap.chunk_index) // 4,
    )


# -- 3: downtime, between two processes ----------------------------------------------------

_FRAME = struct.Struct(">cI")


def send_frame(sock: socket.socket, kind: bytes, payload: bytes) -> None:
    sock.sendall(_FRAME.pack(kind, len(payload)))
    sock.sendall(payload)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    kind, size = _FRAME.unpack(recv_exact(sock, _FRAME.size))
    return kind, recv_exact(sock, size)


def serve_target(argv: Sequence[str]) -> int:
    """``target --port PORT --module PATH``: connect to the source and take migrations until
    told to quit. Each one finishes here; the reply says when it was running again."""
    parser = argparse.ArgumentParser(prog="migration.py target")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--module", type=Path, required=True)
    args = parser.parse_args(argv)
    wasm = args.module.read_bytes()
    sha = sha256(wasm)
    plain = WasmRuntime(wasi_nn=None)
    mig = MigratableRuntime(plain)
    mig.module(sha, wasm)  # compiled before the first migration, as a waiting gateway has it
    with socket.create_connection((LOOPBACK, args.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_frame(sock, b"K", b"")
        incoming = None
        while True:
            kind, payload = recv_frame(sock)
            if kind == b"Q":
                break
            if kind == b"B":
                begin = json.loads(payload)
                if begin["mode"] == "precopy":
                    incoming = mig.receive(sha, begin["run_id"], limits=LIMITS)
                send_frame(sock, b"K", b"")
            elif kind == b"R":
                assert incoming is not None
                incoming.apply(decode_round(payload))
                send_frame(sock, b"A", b"")  # applied: the source may measure the next round
            elif kind == b"S":
                received_at = time.monotonic()
                snapshot = decode_snapshot(payload, module=sha)
                if incoming is not None:
                    run = incoming.resume(snapshot, where="target")
                    incoming = None
                else:
                    run = mig.resume(snapshot, limits=LIMITS, where="target")
                # Running again here is what is measured; a little more shows it goes on right.
                run.on_migration_point = lambda r: (
                    r.pause() if r.migration_points == TARGET_POINTS else None
                )
                result = run.execute()
                stdout = (
                    result.snapshot.wasi.stdout if isinstance(result, Paused) else result.stdout
                )
                reply = {
                    "received_at": received_at,
                    "resumed_at": run.resumed_at,
                    "stdout": base64.b64encode(stdout).decode(),
                }
                send_frame(sock, b"D", json.dumps(reply).encode())
    plain.close()
    return 0


class TargetProcess:
    """The target side in a subprocess of its own, connected back to us over loopback."""

    def __init__(self, module: Path, log_path: Path) -> None:
        self._listener = socket.create_server((LOOPBACK, 0))
        port = self._listener.getsockname()[1]
        argv = [sys.executable, str(Path(__file__).resolve()), "target"]
        argv += ["--port", str(port), "--module", str(module)]
        with log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._listener.settimeout(60)
        self.sock, _ = self._listener.accept()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.expect(b"K")

    def expect(self, kind: bytes) -> bytes:
        got, payload = recv_frame(self.sock)
        if got != kind:
            raise RuntimeError(f"target sent {got!r}, expected {kind!r}")
        return payload

    def close(self) -> None:
        with contextlib.suppress(OSError):
            send_frame(self.sock, b"Q", b"")
        self.sock.close()
        self._listener.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


@dataclass
class Trial:
    mode: str
    downtime_ms: float
    capture_ms: float  # stopped at the source -> snapshot in hand
    transfer_ms: float  # -> all of it received at the target
    restore_ms: float  # -> running again at the target
    rounds: int = 0
    round_bytes: int = 0  # pre-copy rounds, all together
    final_bytes: int = 0  # the snapshot sent while the run was stopped
    last_round_bytes: int = 0
    migration_ms: float = 0.0  # from the first round to running at the target


def migrate_once(
    mig: MigratableRuntime, target: TargetProcess, module: Module, mode: str, reference: bytes
) -> Trial:
    run = mig.start(module.sha, args=DIRTY_ARGS, limits=LIMITS)
    outcome: list[Finished | Paused | Exception] = []
    final: dict[str, float] = {}

    def send_final(snapshot: Snapshot) -> None:
        # On the executing thread, as soon as the snapshot exists (Run.on_paused).
        final["captured_at"] = time.monotonic()
        data = encode_snapshot(snapshot, level=0)
        send_frame(target.sock, b"S", data)
        final["bytes"] = len(data)

    def execute() -> None:
        try:
            outcome.append(run.execute())
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, raised there
            outcome.append(exc)

    run.on_paused = send_final
    worker = threading.Thread(target=execute, name="source-run")
    worker.start()
    try:
        deadline = time.monotonic() + TRIAL_TIMEOUT_S
        while run.migration_points < DIRTY_WARM_POINTS and worker.is_alive():
            if time.monotonic() > deadline:
                raise TimeoutError("the source run did not get going")
            time.sleep(0.005)
        send_frame(target.sock, b"B", json.dumps({"mode": mode, "run_id": run.run_id}).encode())
        target.expect(b"K")
        began_at = time.monotonic()
        sent: list[int] = []
        if mode == "precopy":

            def send(message: MemoryRound) -> None:
                send_frame(target.sock, b"R", encode_round(message, level=0))
                target.expect(b"A")  # one round at a time: none queued behind the final one

            sent = run.precopy(send)
        else:
            run.pause()
    finally:
        worker.join()
    paused = outcome[0]
    if isinstance(paused, Exception):
        raise paused
    if not isinstance(paused, Paused) or run.paused_at is None:
        raise RuntimeError("the source run finished before it was moved: raise its steps")
    reply = json.loads(target.expect(b"D"))
    stdout = base64.b64decode(reply["stdout"])
    if not reference.startswith(stdout) or stdout.count(b"\n") < DIRTY_WARM_POINTS:
        raise RuntimeError(f"{mode}: the moved run's output differs from the plain run's")
    resumed_at, received_at = float(reply["resumed_at"]), float(reply["received_at"])
    return Trial(
        mode=mode,
        downtime_ms=(resumed_at - run.paused_at) * 1e3,
        capture_ms=(final["captured_at"] - run.paused_at) * 1e3,
        transfer_ms=(received_at - final["captured_at"]) * 1e3,
        restore_ms=(resumed_at - received_at) * 1e3,
        rounds=len(sent),
        round_bytes=sum(sent),
        final_bytes=int(final["bytes"]),
        last_round_bytes=sent[-1] if sent else 0,
        migration_ms=(resumed_at - began_at) * 1e3,
    )


def measure_downtime(
    plain: WasmRuntime, mig: MigratableRuntime, module: Module, trials: int, work_dir: Path
) -> dict[str, list[Trial]]:
    reference = plain.run(module.plain_sha, args=DIRTY_ARGS, limits=LIMITS).stdout
    target = TargetProcess(module.path, work_dir / "target.log")
    results: dict[str, list[Trial]] = {"precopy": [], "stop": []}
    try:
        for i in range(trials):
            for mode in ("precopy", "stop") if i % 2 == 0 else ("stop", "precopy"):
                trial = migrate_once(mig, target, module, mode, reference)
                log.info(
                    "%s: downtime %.1f ms (capture %.1f, transfer %.1f, restore %.1f), "
                    "%d rounds %.1f MiB (last %.2f MiB), final %.2f MiB, in all %.0f ms",
                    mode,
                    trial.downtime_ms,
                    trial.capture_ms,
                    trial.transfer_ms,
                    trial.restore_ms,
                    trial.rounds,
                    trial.round_bytes / 2**20,
                    trial.last_round_bytes / 2**20,
                    trial.final_bytes / 2**20,
                    trial.migration_ms,
                )
                results[mode].append(trial)
    finally:
        target.close()
    return results


# -- the run -------------------------------------------------------------------------------

Figures = dict[str, float | int | bool]


@dataclass
class Outcome:
    figures: Figures
    overhead: dict[str, Overhead] = field(default_factory=dict)
    snapshots: dict[str, SnapshotSize] = field(default_factory=dict)
    downtime: dict[str, list[Trial]] = field(default_factory=dict)
    mqtt: dict[str, list[MqttTrial]] = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    runs: int
    trials: int
    parts: frozenset[str] = frozenset(PARTS)


def median_of(trials: Sequence[Trial], name: str) -> float:
    return float(statistics.median(getattr(t, name) for t in trials))


def run(opts: Options, work_dir: Path) -> Outcome:
    if wasm_opt_path() is None:
        raise SystemExit(
            "migration benchmark: needs Binaryen's wasm-opt (apt-get install binaryen)"
        )
    names = [w.name for w in workloads()] + ["dirtymem"]
    # Paths relative to build/examples (the modules are in its wasm/).
    directory = ensure_examples(*(f"wasm/{n}.migratable.wasm" for n in names)) / "wasm"
    plain = WasmRuntime(wasi_nn=None)
    mig = MigratableRuntime(plain)
    outcome = Outcome({})
    f = outcome.figures
    try:
        modules = {name: load(plain, directory, name) for name in names}
        for work in workloads() if "overhead" in opts.parts else []:
            over = measure_overhead(plain, mig, modules[work.name], work, opts.runs)
            size = measure_snapshot(mig, modules[work.name], work, over.points)
            outcome.overhead[work.name], outcome.snapshots[work.name] = over, size
            log.info("%s: overhead %.2f, snapshot %d bytes", work.name, over.ratio, size.file_bytes)
            f[f"{work.name}_plain_cpu_ms"] = over.plain_ms
            f[f"{work.name}_migratable_cpu_ms"] = over.migratable_ms
            f[f"{work.name}_overhead_ratio"] = over.ratio
            f[f"{work.name}_asyncify_ratio"] = over.asyncify_ratio
            f[f"{work.name}_migration_points"] = over.points
            f[f"{work.name}_snapshot_bytes"] = size.file_bytes
            f[f"{work.name}_snapshot_body_bytes"] = size.body_bytes
            f[f"{work.name}_memory_bytes"] = size.memory_bytes
        if outcome.overhead:
            f["overhead_max_ratio"] = max(o.ratio for o in outcome.overhead.values())
            f["overhead_ok"] = f["overhead_max_ratio"] <= TARGET_OVERHEAD
        if "downtime" in opts.parts:
            outcome.downtime = measure_downtime(
                plain, mig, modules["dirtymem"], opts.trials, work_dir
            )
    finally:
        plain.close()
    if outcome.downtime:
        downtime_figures(outcome)
    if "mqtt" in opts.parts:
        outcome.mqtt = measure_mqtt(opts.trials, work_dir)
        mqtt_figures(outcome)
    return outcome


def mqtt_figures(outcome: Outcome) -> None:
    f = outcome.figures
    for mode, key in (("precopy", "mqtt_precopy"), ("stop", "mqtt_stop_copy")):
        trials = outcome.mqtt[mode]
        f[f"{key}_downtime_ms"] = float(statistics.median(t.downtime_ms for t in trials))
        f[f"{key}_downtime_max_ms"] = max(t.downtime_ms for t in trials)
        f[f"{key}_migration_ms"] = float(statistics.median(t.migration_ms for t in trials))
    pre = outcome.mqtt["precopy"]
    f["mqtt_precopy_rounds"] = int(statistics.median(t.rounds for t in pre))
    f["mqtt_precopy_round_bytes"] = int(statistics.median(t.round_bytes for t in pre))
    f["mqtt_downtime_ratio"] = f["mqtt_precopy_downtime_ms"] / f["mqtt_stop_copy_downtime_ms"]
    f["mqtt_precopy_ok"] = f["mqtt_precopy_downtime_ms"] <= TARGET_DOWNTIME_MS
    f["mqtt_state_bytes"] = int(MQTT_ARGS[0]) << 20


def downtime_figures(outcome: Outcome) -> None:
    f = outcome.figures
    for mode, key in (("precopy", "precopy"), ("stop", "stop_copy")):
        trials = outcome.downtime[mode]
        for name in ("downtime_ms", "capture_ms", "transfer_ms", "restore_ms"):
            f[f"{key}_{name}"] = median_of(trials, name)
        f[f"{key}_downtime_max_ms"] = max(t.downtime_ms for t in trials)
        f[f"{key}_final_bytes"] = int(median_of(trials, "final_bytes"))
    pre = outcome.downtime["precopy"]
    f["precopy_rounds"] = int(median_of(pre, "rounds"))
    f["precopy_round_bytes"] = int(median_of(pre, "round_bytes"))
    f["precopy_last_round_bytes"] = int(median_of(pre, "last_round_bytes"))
    for key, mode in (("precopy", "precopy"), ("stop_copy", "stop")):
        f[f"{key}_migration_ms"] = median_of(outcome.downtime[mode], "migration_ms")
    f["precopy_ok"] = f["precopy_downtime_ms"] <= TARGET_DOWNTIME_MS
    f["state_bytes"] = int(DIRTY_ARGS[0]) << 20


OVERHEAD_COLUMNS = (
    "example",
    "plain ms",
    "asyncify ms",
    "migratable ms",
    "asyncify x",
    "migratable x",
    "points",
)
TRIAL_COLUMNS = (
    "mode",
    "downtime ms",
    "capture",
    "transfer",
    "restore",
    "rounds",
    "round bytes",
    "last round",
    "final bytes",
    "in all ms",
)


def print_report(outcome: Outcome) -> None:
    f = outcome.figures
    targets: list[list[object]] = []
    if outcome.overhead:
        print_table(
            OVERHEAD_COLUMNS,
            [
                [n, o.plain_ms, o.asyncify_ms, o.migratable_ms, o.asyncify_ratio, o.ratio, o.points]
                for n, o in outcome.overhead.items()
            ],
            title="Instrumentation overhead (CPU ms, median): the plain module under "
            "WasmRuntime, the instrumented one under WasmRuntime, and under MigratableRuntime",
        )
        print_table(
            ("example", "memory bytes", "chunks", "body bytes", "file bytes"),
            [
                [n, s.memory_bytes, s.chunks, s.body_bytes, s.file_bytes]
                for n, s in outcome.snapshots.items()
            ],
            title="Snapshot half-way through (file: zlib level 1)",
        )
        ratio = float(f["overhead_max_ratio"])
        verdict_text = verdict(ratio, TARGET_OVERHEAD, at_most=True)
        targets.append(["overhead, worst example", ratio, f"<= {TARGET_OVERHEAD}", verdict_text])
    if outcome.downtime:
        print_table(
            TRIAL_COLUMNS,
            [
                [
                    mode,
                    t.downtime_ms,
                    t.capture_ms,
                    t.transfer_ms,
                    t.restore_ms,
                    t.rounds,
                    t.round_bytes,
                    t.last_round_bytes,
                    t.final_bytes,
                    t.migration_ms,
                ]
                for mode, trials in outcome.downtime.items()
                for t in trials
            ],
            title=f"Moving dirtymem ({f['state_bytes'] >> 20} MiB) to another process over "
            "loopback (ms, bytes)",
        )
        down = float(f["precopy_downtime_ms"])
        verdict_text = verdict(down, TARGET_DOWNTIME_MS, at_most=True)
        targets.append(
            ["pre-copy downtime ms, median", down, f"<= {TARGET_DOWNTIME_MS:g}", verdict_text]
        )
        targets.append(
            ["stop-and-copy downtime ms, median", float(f["stop_copy_downtime_ms"]), "-", "-"]
        )
    if outcome.mqtt:
        print_table(
            ("mode", "downtime ms", "rounds", "round bytes", "in all ms"),
            [
                [mode, t.downtime_ms, t.rounds, t.round_bytes, t.migration_ms]
                for mode, trials in outcome.mqtt.items()
                for t in trials
            ],
            title=f"Moving dirtymem ({f['mqtt_state_bytes'] >> 20} MiB) from a gateway to its "
            "device over MQTT on loopback (ms, bytes)",
        )
        down = float(f["mqtt_precopy_downtime_ms"])
        verdict_text = verdict(down, TARGET_DOWNTIME_MS, at_most=True)
        targets.append(
            ["MQTT pre-copy downtime ms, median", down, f"<= {TARGET_DOWNTIME_MS:g}", verdict_text]
        )
        targets.append(
            ["MQTT stop-and-copy downtime ms, median", f["mqtt_stop_copy_downtime_ms"], "-", "-"]
        )
    print_table(["figure", "value", "target", "verdict"], targets, title="Targets")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["target"]:
        return serve_target(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help=f"runs per example (default {DEFAULT_RUNS})"
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=DEFAULT_TRIALS,
        help=f"migrations per mode (default {DEFAULT_TRIALS})",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="what to measure, comma-separated: overhead (with snapshot sizes), downtime, mqtt",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    parts = frozenset(args.parts.split(","))
    if args.runs < 1 or args.trials < 1:
        parser.error("--runs and --trials must be at least 1")
    if not parts or not parts <= set(PARTS):
        parser.error(f"--parts: some of {', '.join(PARTS)}")
    setup_logging(args.verbose)
    opts = Options(runs=args.runs, trials=args.trials, parts=parts)
    return run_and_report(lambda tmp: run(opts, tmp), args.json, print_report)


if __name__ == "__main__":
    raise SystemExit(main())
