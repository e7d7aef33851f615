"""Migratable runs in one process (docs/migration.md): pause anywhere, resume elsewhere, same
bytes out. No gateway: hops are resumptions under other names, each through the snapshot file
format. The modules are the examples and their Asyncify-instrumented twins
(scripts/build_examples.py), under real wasmtime and Binaryen's real output."""

from __future__ import annotations

import hashlib
import itertools
import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import pytest

from hearth.errors import ErrorCode, JobError
from hearth.runtime import _chunks
from hearth.runtime.asyncify import instrument, wasm_opt_path
from hearth.runtime.limits import WasmLimits
from hearth.runtime.migratable import Finished, MemoryImage, MigratableRuntime, Paused, Run
from hearth.runtime.snapshot import (
    Snapshot,
    decode_round,
    decode_snapshot,
    encode_round,
    encode_snapshot,
    snapshot_sha256,
)
from hearth.runtime.wasm import WasmOutcome, WasmRuntime

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "build" / "examples" / "wasm"
MIGRATABLE = ("hashchain", "primes", "dirtymem", "scratch", "spin", "memhog", "flood", "nn_digits")
HOPS = ("local", "gateway", "peer", "local")
TRIALS = 50
BIG_FUEL = WasmLimits(fuel=10**12)

pytestmark = pytest.mark.skipif(
    wasm_opt_path() is None, reason="migratable runs need Binaryen's wasm-opt"
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Example:
    plain: bytes
    migratable: bytes

    @property
    def plain_sha(self) -> str:
        return _sha(self.plain)

    @property
    def sha(self) -> str:
        return _sha(self.migratable)


@pytest.fixture(scope="module")
def examples() -> dict[str, Example]:
    paths = [WASM / f"{name}.migratable.wasm" for name in MIGRATABLE]
    if not all(p.exists() for p in paths):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_examples.py")], check=True)
    return {
        name: Example(
            (WASM / f"{name}.wasm").read_bytes(), (WASM / f"{name}.migratable.wasm").read_bytes()
        )
        for name in MIGRATABLE
    }


@pytest.fixture(scope="module")
def plain() -> Iterator[WasmRuntime]:
    runtime = WasmRuntime(wasi_nn=None)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def mig(plain: WasmRuntime, examples: dict[str, Example]) -> MigratableRuntime:
    runtime = MigratableRuntime(plain)
    for example in examples.values():
        plain.load(example.plain_sha, example.plain)
        plain.load(example.sha, example.migratable)
    return runtime


def reference(plain: WasmRuntime, example: Example, args=(), stdin=b"") -> WasmOutcome:
    """The uninterrupted run of the plain module under wasmtime's own WASI."""
    return plain.run(example.plain_sha, args=args, stdin=stdin, limits=BIG_FUEL)


def pause_at(run: Run, point: int) -> Run:
    """Pause ``run`` at its ``point``-th migration point (1-based)."""

    def hook(r: Run) -> None:
        if r.migration_points == point:
            r.pause()

    run.on_migration_point = hook
    return run


def hop(mig: MigratableRuntime, snapshot: Snapshot, where: str, **kw) -> Run:
    """What moving does: the snapshot file, named by its hash, decoded at the other end."""
    data = encode_snapshot(snapshot)
    decoded = decode_snapshot(data, sha256=snapshot_sha256(data), module=snapshot.module)
    return mig.resume(decoded, where=where, **kw)


def count_points(mig: MigratableRuntime, example: Example, args=(), stdin=b"") -> int:
    run = mig.start(example.sha, args=args, stdin=stdin, limits=BIG_FUEL)
    assert isinstance(run.execute(), Finished)
    return run.migration_points


def assert_same(result: Finished | Paused, ref: WasmOutcome) -> None:
    assert isinstance(result, Finished)
    assert result.stdout == ref.stdout
    assert result.stderr == ref.stderr
    assert result.exit_code == ref.exit_code


# -- (a) pause anywhere, resume anywhere ---------------------------------------------------


def _hashchain_case(
    plain: WasmRuntime, example: Example, rng: random.Random
) -> tuple[tuple[str, ...], bytes]:
    """Arguments and stdin for one trial: sizes from none to ~30 chunks, 1 to 4 rounds, and
    an EXPECT that is right (exit 0), wrong (exit 1) or absent."""
    stdin = rng.randbytes(rng.choice([0, 1, 4095, 4096, rng.randrange(20_000, 120_000)]))
    rounds = str(rng.randint(1, 4))
    shape = rng.choice(["none", "wrong", "right"])
    if shape == "wrong" or not stdin:
        return (rounds, "0123456789abcdef"), stdin
    if shape == "none":
        return (rounds,), stdin
    final = reference(plain, example, (rounds,), stdin).stdout.splitlines()[-1]
    return (rounds, final.split(b"digest ")[1][:16].decode()), stdin


def test_hashchain_paused_at_random_points_and_moved_local_gateway_peer_local_is_byte_identical(
    plain: WasmRuntime, mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["hashchain"]
    rng = random.Random(20261203)
    exits = set()
    for _trial in range(TRIALS):
        args, stdin = _hashchain_case(plain, example, rng)
        ref = reference(plain, example, args, stdin)
        exits.add(ref.exit_code)
        total = count_points(mig, example, args, stdin)
        # Three pauses at distinct points, in order; each hop runs to the next one.
        points = sorted(rng.sample(range(1, total + 1), min(3, total)))
        run = mig.start(example.sha, args=args, stdin=stdin, limits=BIG_FUEL, where=HOPS[0])
        done = 0
        for where, point in zip(HOPS[1:], points, strict=False):
            paused = pause_at(run, point - done).execute()
            assert isinstance(paused, Paused), f"no pause at point {point} of {total}"
            done = point
            run = hop(mig, paused.snapshot, where)
        result = run.execute()
        assert_same(result, ref)
        assert isinstance(result, Finished)
        assert result.hops == HOPS[: len(points) + 1]
    assert exits == {0, 1, 3}  # the exit status travels too: right, wrong, no input


def test_every_migration_point_of_a_short_run_is_a_place_to_move(
    plain: WasmRuntime, mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["hashchain"]
    stdin = random.Random(7).randbytes(30_000)
    ref = reference(plain, example, ("2",), stdin)
    for point in range(1, count_points(mig, example, ("2",), stdin) + 1):
        run = pause_at(mig.start(example.sha, args=("2",), stdin=stdin), point)
        paused = run.execute()
        assert isinstance(paused, Paused)
        assert_same(hop(mig, paused.snapshot, "gateway").execute(), ref)


def test_the_same_snapshot_resumes_twice_to_the_same_result(
    mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["hashchain"]
    stdin = random.Random(8).randbytes(50_000)
    paused = pause_at(mig.start(example.sha, stdin=stdin), 5).execute()
    assert isinstance(paused, Paused)
    first = mig.resume(paused.snapshot, where="a").execute()
    second = mig.resume(paused.snapshot, where="b").execute()
    assert isinstance(first, Finished)
    assert isinstance(second, Finished)
    assert (first.stdout, first.exit_code) == (second.stdout, second.exit_code)
    assert (first.hops, second.hops) == (("local", "a"), ("local", "b"))


def test_snapshots_count_up_across_hops(
    mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["hashchain"]
    stdin = random.Random(9).randbytes(60_000)
    run = pause_at(mig.start(example.sha, stdin=stdin), 3)
    seqs = []
    for where in ("gateway", "peer"):
        paused = run.execute()
        assert isinstance(paused, Paused)
        seqs.append(paused.snapshot.seq)
        run = pause_at(hop(mig, paused.snapshot, where), 3)
    assert seqs == [0, 1]


# -- (b) /scratch travels -------------------------------------------------------------------


def test_scratch_files_written_before_a_pause_are_there_after_resume(
    plain: WasmRuntime, mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["hashchain"]
    stdin = random.Random(10).randbytes(80_000)
    ref = reference(plain, example, ("1",), stdin)
    total = count_points(mig, example, ("1",), stdin)
    paused = pause_at(mig.start(example.sha, args=("1",), stdin=stdin), total - 2).execute()
    assert isinstance(paused, Paused)
    journal = bytes(paused.snapshot.wasi.files["chain.log"])
    assert journal.startswith(b"1 ")
    assert journal.count(b"\n") >= 10
    # The program re-reads its journal at the end; exit status 4 would mean it was lost.
    result = hop(mig, paused.snapshot, "gateway").execute()
    assert_same(result, ref)
    assert ref.exit_code == 0


def test_a_scratch_directory_and_its_files_survive_a_move(
    mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    # scratch.c's report: files and a subdirectory made early, read back and listed later.
    example = examples["scratch"]
    whole = mig.start(example.sha).execute()
    assert isinstance(whole, Finished)
    assert b"scratch write and read back: ok" in whole.stdout
    assert b"scratch subdirectory: ok" in whole.stdout
    assert b"ALLOWED" not in whole.stdout
    for point in range(1, count_points(mig, example) + 1):
        paused = pause_at(mig.start(example.sha), point).execute()
        assert isinstance(paused, Paused)
        moved = hop(mig, paused.snapshot, "peer").execute()
        assert isinstance(moved, Finished)
        assert (moved.stdout, moved.exit_code) == (whole.stdout, whole.exit_code)


# -- (c) checkpoints ------------------------------------------------------------------------


def test_checkpoint_every_n_points_then_resume_from_the_last_repeats_at_most_one_interval(
    plain: WasmRuntime, mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["hashchain"]
    stdin = random.Random(11).randbytes(100_000)
    ref = reference(plain, example, ("2",), stdin)
    total = count_points(mig, example, ("2",), stdin)
    rng = random.Random(12)
    for every in (1, 3, 7):
        crash = rng.randrange(every + 1, total)
        run = pause_at(mig.start(example.sha, args=("2",), stdin=stdin), crash)
        run.checkpoint_every_points = every
        taken: list[tuple[int, Snapshot]] = []
        run.on_checkpoint = lambda snap, run=run, taken=taken: taken.append(
            (run.migration_points, snap)
        )
        # The crash: the run stops at point `crash` and what it had then is lost.
        assert isinstance(run.execute(), Paused)
        assert [p for p, _ in taken] == list(range(every, crash, every))
        last_point, last = taken[-1]
        assert crash - last_point <= every
        resumed = hop(mig, last, "gateway")
        assert_same(resumed.execute(), ref)
        # It went on from the checkpoint, not from the start: the points it passed are the
        # run's after the checkpoint, those up to the crash being the work done twice.
        assert resumed.migration_points == total - last_point


def test_checkpoint_every_so_many_seconds_then_resume_from_the_last(
    plain: WasmRuntime, mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["primes"]
    args = ("3000000",)
    ref = reference(plain, example, args)
    interval_s = 0.05
    crash = random.Random(18).randrange(1500, 2500)  # of ~2900 points (yields, mostly)
    run = pause_at(mig.start(example.sha, args=args, limits=BIG_FUEL), crash)
    run.checkpoint_every_s = interval_s
    taken: list[tuple[float, Snapshot]] = []
    run.on_checkpoint = lambda snap: taken.append((time.monotonic(), snap))
    point_times: list[float] = []
    pause_hook = run.on_migration_point
    assert pause_hook is not None

    def hook(r: Run) -> None:
        point_times.append(time.monotonic())
        pause_hook(r)

    run.on_migration_point = hook
    assert isinstance(run.execute(), Paused)
    assert run.paused_at is not None
    assert len(taken) >= 2
    # No checkpoint was due at the point before the crash unless one was taken there, so what
    # is done again is at most one interval plus the last gap between two points.
    assert run.paused_at - taken[-1][0] < interval_s + (run.paused_at - point_times[-2])
    assert_same(hop(mig, taken[-1][1], "peer", limits=BIG_FUEL).execute(), ref)


def test_checkpoint_every_so_many_bytes_of_progress_whichever_first_then_resume(
    plain: WasmRuntime, mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    """Progress is the run's I/O: bytes read (stdin, /scratch) plus bytes written (stdout,
    stderr, /scratch). With a seconds interval far away, the bytes one decides alone."""
    example = examples["hashchain"]
    stdin = random.Random(19).randbytes(400_000)
    ref = reference(plain, example, ("2",), stdin)
    total = count_points(mig, example, ("2",), stdin)
    every = 64 * 1024
    crash = random.Random(20).randrange(total // 2, total - 5)
    run = pause_at(mig.start(example.sha, args=("2",), stdin=stdin), crash)
    run.checkpoint_every_bytes = every
    run.checkpoint_every_s = 3600.0
    taken: list[tuple[int, Snapshot]] = []
    run.on_checkpoint = lambda snap: taken.append((run.host.progress_bytes, snap))
    assert isinstance(run.execute(), Paused)
    at_crash = run.host.progress_bytes
    assert len(taken) >= 2
    # One is taken at the first migration point past each interval: a call moves at most one
    # 4 KiB read (and hashchain's progress line) past it.
    done = [0] + [progress for progress, _ in taken]
    for before, after in itertools.pairwise(done):
        assert every <= after - before < every + 4096 + 256
    # What is done again after resuming the last: less than one interval of progress more.
    assert at_crash - taken[-1][0] < every + 4096 + 256
    assert_same(hop(mig, taken[-1][1], "gateway").execute(), ref)


def test_a_checkpoint_asked_for_is_taken_at_the_next_point_and_the_run_goes_on(
    plain: WasmRuntime, mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["hashchain"]
    stdin = random.Random(13).randbytes(40_000)
    ref = reference(plain, example, (), stdin)
    run = mig.start(example.sha, stdin=stdin)
    taken: list[Snapshot] = []
    run.on_checkpoint = taken.append
    run.on_migration_point = lambda r: r.checkpoint() if r.migration_points == 4 else None
    assert_same(run.execute(), ref)
    assert len(taken) == 1
    assert_same(hop(mig, taken[0], "gateway").execute(), ref)


# -- (d) snapshots that must not run --------------------------------------------------------


@pytest.fixture(scope="module")
def paused_file(mig: MigratableRuntime, examples: dict[str, Example]) -> bytes:
    stdin = random.Random(14).randbytes(30_000)
    paused = pause_at(mig.start(examples["hashchain"].sha, stdin=stdin), 4).execute()
    assert isinstance(paused, Paused)
    return encode_snapshot(paused.snapshot)


def _finished_file(mig: MigratableRuntime, example: Example) -> bytes:
    run = mig.start(example.sha, stdin=b"x")
    assert isinstance(run.execute(), Finished)
    return encode_snapshot(run.snapshot)


def _with_version(data: bytes, version: int) -> bytes:
    return data[:8] + struct.pack(">H", version) + data[10:]


def _flipped(data: bytes) -> bytes:
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x01
    return bytes(bad)


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("bytes not matching their hash", ErrorCode.HASH_MISMATCH),
        ("for another module", ErrorCode.SNAPSHOT_MISMATCH),
        ("truncated", ErrorCode.BAD_SNAPSHOT),
        ("not a snapshot", ErrorCode.BAD_SNAPSHOT),
        ("a newer format version", ErrorCode.UNSUPPORTED_VERSION),
        ("of a finished run", ErrorCode.RUN_FINISHED),
    ],
)
def test_a_bad_snapshot_is_refused_with_its_code_and_nothing_runs(
    mig: MigratableRuntime,
    examples: dict[str, Example],
    paused_file: bytes,
    case: str,
    code: ErrorCode,
) -> None:
    hashchain = examples["hashchain"]
    data, sha, module = paused_file, snapshot_sha256(paused_file), hashchain.sha
    if case == "bytes not matching their hash":
        data = _flipped(data)
    elif case == "for another module":
        module = examples["primes"].sha
    elif case == "truncated":
        data, sha = data[: len(data) // 2], None
    elif case == "not a snapshot":
        data, sha = b"\x89PNG\r\n\x1a\n" + data[8:], None
    elif case == "a newer format version":
        data, sha = _with_version(data, 2), None
    elif case == "of a finished run":
        data = _finished_file(mig, hashchain)
        sha = snapshot_sha256(data)
    started: list[Run] = []

    def resume_file() -> None:
        started.append(mig.resume(decode_snapshot(data, sha256=sha, module=module)))

    with pytest.raises(JobError) as info:
        resume_file()
    assert info.value.code == code
    assert started == []


def test_a_finished_run_cannot_be_resumed_even_past_the_decoder(
    mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    run = mig.start(examples["hashchain"].sha, stdin=b"x")
    assert isinstance(run.execute(), Finished)
    with pytest.raises(JobError) as info:
        mig.resume(run.snapshot)
    assert info.value.code == ErrorCode.RUN_FINISHED


def test_a_corrupt_body_is_a_bad_snapshot(paused_file: bytes) -> None:
    snapshot = decode_snapshot(paused_file)
    past_end = msgspec.structs.replace(snapshot, chunk_index=struct.pack("<I", 1 << 30))
    with pytest.raises(JobError) as info:
        decode_snapshot(encode_snapshot(past_end))
    assert info.value.code == ErrorCode.BAD_SNAPSHOT
    with pytest.raises(JobError) as info:
        decode_snapshot(paused_file + b"trailing")
    assert info.value.code == ErrorCode.BAD_SNAPSHOT


# -- (e) limits hold, and what is refused --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "limits", "code"),
    [
        ("spin", WasmLimits(fuel=50_000_000), ErrorCode.TIMEOUT),
        ("memhog", WasmLimits(memory_bytes=32 * 1024 * 1024), ErrorCode.MEMORY_LIMIT),
        ("flood", WasmLimits(output_bytes=1024 * 1024), ErrorCode.OUTPUT_LIMIT),
    ],
)
def test_limits_hold_in_migratable_runs(
    mig: MigratableRuntime,
    examples: dict[str, Example],
    name: str,
    limits: WasmLimits,
    code: ErrorCode,
) -> None:
    with pytest.raises(JobError) as info:
        mig.start(examples[name].sha, limits=limits).execute()
    assert info.value.code == code


def test_fuel_used_before_a_move_counts_after_it(
    mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["hashchain"]
    stdin = random.Random(15).randbytes(100_000)
    whole = mig.start(example.sha, stdin=stdin)
    finished = whole.execute()
    assert isinstance(finished, Finished)
    paused = pause_at(mig.start(example.sha, stdin=stdin), 20).execute()
    assert isinstance(paused, Paused)
    used = paused.snapshot.fuel_used
    assert 0 < used < finished.fuel_used
    # Enough fuel for the rest of the run, but not for the whole of it: the limit is the run's.
    tight = WasmLimits(fuel=(used + finished.fuel_used) // 2)
    with pytest.raises(JobError) as info:
        hop(mig, paused.snapshot, "gateway", limits=tight).execute()
    assert info.value.code == ErrorCode.TIMEOUT
    moved = hop(mig, paused.snapshot, "gateway").execute()
    assert isinstance(moved, Finished)
    assert moved.fuel_used >= finished.fuel_used


def test_the_memory_limit_holds_where_a_run_resumes(
    mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    paused = pause_at(mig.start(examples["dirtymem"].sha, args=("8", "5")), 3).execute()
    assert isinstance(paused, Paused)
    with pytest.raises(JobError) as info:
        hop(mig, paused.snapshot, "gateway", limits=WasmLimits(memory_bytes=4 << 20)).execute()
    assert info.value.code == ErrorCode.MEMORY_LIMIT


def test_a_module_that_is_not_instrumented_is_refused(
    mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    with pytest.raises(JobError) as info:
        mig.start(examples["hashchain"].plain_sha)
    assert info.value.code == ErrorCode.INVALID_MODULE


def test_a_module_that_imports_wasi_nn_cannot_migrate(
    mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    with pytest.raises(JobError) as info:
        mig.start(examples["nn_digits"].sha).execute()
    assert info.value.code == ErrorCode.INVALID_MODULE


# -- (f) hearth_yield -----------------------------------------------------------------------


def test_a_pure_compute_loop_with_hearth_yield_migrates(
    plain: WasmRuntime, mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["primes"]
    args = ("400000",)
    ref = reference(plain, example, args)
    total = count_points(mig, example, args)
    # Four progress lines and one result are all the I/O: nearly every point is a yield.
    assert total > 300
    rng = random.Random(16)
    for _ in range(5):
        first, second = sorted(rng.sample(range(1, total + 1), 2))
        paused = pause_at(mig.start(example.sha, args=args), first).execute()
        assert isinstance(paused, Paused)
        again = pause_at(hop(mig, paused.snapshot, "gateway"), second - first).execute()
        assert isinstance(again, Paused)
        assert_same(hop(mig, again.snapshot, "local").execute(), ref)


def test_a_pause_asked_from_another_thread_stops_a_compute_loop_promptly(
    mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    run = mig.start(examples["primes"].sha, args=("2000000000",), limits=BIG_FUEL)
    timer = threading.Timer(0.2, run.pause)
    timer.start()
    started = time.monotonic()
    try:
        result = run.execute()
    finally:
        timer.cancel()
    assert isinstance(result, Paused)
    assert time.monotonic() - started < 5.0


_SLEEPER_WAT = """
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; a clock subscription at 0: userdata 7, tag 0, clock 1 (monotonic), timeout 300 ms
  (data (i32.const 0) "\\07\\00\\00\\00\\00\\00\\00\\00\\00")
  (data (i32.const 16) "\\01\\00\\00\\00\\00\\00\\00\\00\\00\\a3\\e1\\11\\00\\00\\00\\00")
  (data (i32.const 200) "slept\\0a")
  (data (i32.const 208) "\\c8\\00\\00\\00\\06\\00\\00\\00")
  (func (export "_start")
    (drop (call $poll (i32.const 0) (i32.const 100) (i32.const 1) (i32.const 96)))
    (drop (call $write (i32.const 1) (i32.const 208) (i32.const 1) (i32.const 216)))))
"""


@pytest.fixture(scope="module")
def sleeper(plain: WasmRuntime) -> str:
    import wasmtime

    data = instrument(wasmtime.wat2wasm(_SLEEPER_WAT))
    plain.load(_sha(data), data)
    return _sha(data)


def test_a_sleep_sleeps_its_timeout_and_a_pause_cuts_it_short(
    mig: MigratableRuntime, sleeper: str
) -> None:
    started = time.monotonic()
    result = mig.start(sleeper).execute()
    assert isinstance(result, Finished)
    assert result.stdout == b"slept\n"
    assert time.monotonic() - started >= 0.3
    run = mig.start(sleeper)
    timer = threading.Timer(0.05, run.pause)
    started = time.monotonic()
    timer.start()
    try:
        paused = run.execute()
    finally:
        timer.join()
    assert isinstance(paused, Paused)
    assert time.monotonic() - started < 0.25
    resumed = hop(mig, paused.snapshot, "peer").execute()
    assert isinstance(resumed, Finished)
    assert resumed.stdout == b"slept\n"


_FAULTER_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; one iovec at 0: 64 bytes at 0xfffffff0, far past the end of memory (the guard pages)
  (data (i32.const 0) "\\f0\\ff\\ff\\ff\\40\\00\\00\\00")
  (func (export "_start")
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def test_a_wasi_call_pointing_outside_memory_traps_and_the_host_lives_on(
    plain: WasmRuntime, mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    import wasmtime

    data = instrument(wasmtime.wat2wasm(_FAULTER_WAT))
    plain.load(_sha(data), data)
    with pytest.raises(JobError) as info:
        mig.start(_sha(data)).execute()
    assert info.value.code == ErrorCode.TRAP
    assert "outside memory" in info.value.message
    assert isinstance(mig.start(examples["hashchain"].sha, stdin=b"x").execute(), Finished)


# -- pre-copy -------------------------------------------------------------------------------


def _slowed(run: Run, until: threading.Event) -> None:
    """Keep ``run`` going (and dirtying memory) but slow enough that the rounds finish first."""
    run.on_migration_point = lambda _r: None if until.is_set() else time.sleep(0.002)


def test_precopy_rounds_then_a_delta_resume_byte_identical(
    plain: WasmRuntime, mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["dirtymem"]
    args = ("8", "3000", "4", "4")  # at least 6 s slowed: longer than the rounds take
    ref = reference(plain, example, args)
    run = mig.start(example.sha, args=args, limits=BIG_FUEL)
    rounds_done = threading.Event()
    _slowed(run, rounds_done)
    outcome: list[Finished | Paused] = []
    worker = threading.Thread(target=lambda: outcome.append(run.execute()))
    worker.start()
    try:
        while run.migration_points < 2:  # past the fill: most of memory is in use
            time.sleep(0.01)
        target = mig.receive(example.sha, run.run_id, limits=BIG_FUEL)
        image: MemoryImage | None = None
        sizes = []
        for _ in range(3):
            message, image = run.precopy_round(image)
            target.apply(decode_round(encode_round(message)))
            sizes.append(len(message.chunk_data))
        run.pause(against=image)
    finally:
        rounds_done.set()
        worker.join()
    paused = outcome[0]
    assert isinstance(paused, Paused)
    delta = paused.snapshot
    assert delta.precopy_rounds == 3
    assert sizes[0] >= 8 << 20  # round 0: all of the 8 MiB in use
    assert len(delta.chunk_data) < sizes[0]  # the rest: what changed since (load-dependent)
    data = encode_snapshot(delta)
    moved = target.resume(decode_snapshot(data, module=example.sha), where="peer")
    assert_same(moved.execute(), ref)
    assert moved.resumed_at is not None


def test_precopy_policy_moves_a_run_that_keeps_dirtying_memory(
    plain: WasmRuntime, mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["dirtymem"]
    args = ("16", "2000", "4", "8")
    ref = reference(plain, example, args)
    run = mig.start(example.sha, args=args, limits=BIG_FUEL)
    rounds_done = threading.Event()
    _slowed(run, rounds_done)
    handed_on: list[bytes] = []
    # The final snapshot leaves as soon as it exists, before the source frees its memory.
    run.on_paused = lambda snap: handed_on.append(encode_snapshot(snap))
    outcome: list[Finished | Paused] = []
    worker = threading.Thread(target=lambda: outcome.append(run.execute()))
    worker.start()
    try:
        while run.migration_points < 2:
            time.sleep(0.01)
        target = mig.receive(example.sha, run.run_id, limits=BIG_FUEL)
        sent = run.precopy(lambda message: target.apply(decode_round(encode_round(message))))
    finally:
        rounds_done.set()
        worker.join()
    assert 1 <= len(sent) <= 10
    assert sent[0] >= 16 << 20
    paused = outcome[0]
    assert isinstance(paused, Paused)
    assert handed_on == [encode_snapshot(paused.snapshot)]
    assert paused.snapshot.precopy_rounds == len(sent) == target.rounds
    moved = target.resume(decode_snapshot(handed_on[0]), where="peer")
    result = moved.execute()
    assert_same(result, ref)
    assert isinstance(result, Finished)
    assert result.hops == ("local", "peer")
    assert run.paused_at is not None
    assert moved.resumed_at is not None
    assert moved.resumed_at > run.paused_at


def test_a_delta_snapshot_needs_exactly_its_rounds(
    mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    example = examples["dirtymem"]
    run = mig.start(example.sha, args=("2", "100000"), limits=BIG_FUEL)
    image_box: list[MemoryImage] = []
    messages = []

    def hook(r: Run) -> None:
        # Rounds read from the executing thread itself here: the same code path, in order.
        if r.migration_points in (2, 3):
            message, image = r.precopy_round(image_box[0] if image_box else None)
            image_box[:] = [image]
            messages.append(message)
        elif r.migration_points == 4:
            r.pause(against=image_box[0])

    run.on_migration_point = hook
    paused = run.execute()
    assert isinstance(paused, Paused)
    delta = paused.snapshot
    with pytest.raises(JobError) as info:
        mig.resume(delta)  # no image to apply it to
    assert info.value.code == ErrorCode.SNAPSHOT_MISMATCH
    with mig.receive(example.sha, run.run_id) as short:
        short.apply(messages[0])
        with pytest.raises(JobError) as info:
            short.resume(delta)
        assert info.value.code == ErrorCode.SNAPSHOT_MISMATCH
    with mig.receive(example.sha, run.run_id) as skipped, pytest.raises(JobError) as info:
        skipped.apply(messages[1])
    assert info.value.code == ErrorCode.BAD_SNAPSHOT
    with mig.receive(example.sha, "r-someone-else") as other, pytest.raises(JobError) as info:
        other.apply(messages[0])
    assert info.value.code == ErrorCode.SNAPSHOT_MISMATCH


def test_precopy_of_a_run_that_is_not_executing_is_refused(
    mig: MigratableRuntime, examples: dict[str, Example]
) -> None:
    run = mig.start(examples["hashchain"].sha, stdin=b"abc")
    with pytest.raises(JobError) as info:
        run.precopy_round(None)
    assert info.value.code == ErrorCode.NO_RUN
    assert isinstance(run.execute(), Finished)
    with pytest.raises(JobError) as info:
        run.precopy_round(None)
    assert info.value.code == ErrorCode.NO_RUN


# -- the chunk arithmetic underneath (pure logic) ------------------------------------------


def test_chunks_nonzero_then_changed_rebuild_the_memory_exactly() -> None:
    rng = np.random.default_rng(17)
    chunk = _chunks.CHUNK_BYTES
    memory = np.zeros(64 * chunk, np.uint8)
    memory[5 * chunk : 9 * chunk] = rng.integers(0, 256, 4 * chunk, dtype=np.uint8)
    memory[40 * chunk + 17] = 1
    index, data = _chunks.nonzero(memory)
    assert np.frombuffer(index, "<u4").tolist() == [5, 6, 7, 8, 40]
    held = np.zeros_like(memory)
    _chunks.apply(held, index, data)
    assert np.array_equal(held, memory)
    # Changes, a chunk gone back to zero, and growth: the delta covers exactly those.
    grown = np.concatenate([memory, np.zeros(16 * chunk, np.uint8)])
    grown[6 * chunk] ^= 0xFF
    grown[40 * chunk + 17] = 0
    grown[70 * chunk + 1] = 9
    assert _chunks.changed(grown, held).tolist() == [6, 40, 70]
    index, data = _chunks.delta(grown, held)
    rebuilt = np.concatenate([held, np.zeros(16 * chunk, np.uint8)])
    _chunks.apply(rebuilt, index, data)
    assert np.array_equal(rebuilt, grown)


def test_a_large_memory_compared_in_parts_on_threads_finds_exactly_what_changed() -> None:
    chunk = _chunks.CHUNK_BYTES
    held = np.zeros(10_000 * chunk, np.uint8)  # 39 MiB: more than one part on 2+ cores
    memory = np.zeros(10_500 * chunk, np.uint8)  # and grown since
    expected = [0, 255, 256, 4095, 4096, 5000, 9999, 10_000, 10_499]
    for index in expected:
        memory[index * chunk + chunk - 1] = 1
    assert _chunks.changed(memory, held).tolist() == expected
