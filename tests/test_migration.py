"""Migratable runs across real gateways (docs/migration.md, docs/protocol.md §18): a run moves
device -> gateway -> peer gateway -> device at random points with byte-identical output; a
gateway's SIGTERM sends its runs home; a SIGKILLed gateway's run resumes from its last
checkpoint; private runs never reach a cloud tier; bad snapshots are refused with their codes
and the gateway goes on serving. Everything on 127.0.0.1, each gateway with its own Mosquitto.
"""

from __future__ import annotations

import hashlib
import random
import struct
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import GatewayProcess, wait_until
from hearth.errors import ErrorCode, JobError
from hearth.protocol import Error, RunAck, RunControl, RunResult, RunResume, RunStart
from hearth.runtime.limits import WasmLimits
from hearth.runtime.migratable import MigratableRuntime, Paused
from hearth.runtime.snapshot import SNAPSHOT_MAGIC, encode_snapshot, snapshot_sha256
from hearth.runtime.wasm import WasmRuntime

pytestmark = pytest.mark.slow

ROUNDS = "2400"  # FNV rounds per 4 KiB chunk: ~1 s of work over STDIN_BYTES here
STDIN_BYTES = 256 * 1024
TRIALS = 50
# Runs longer than the default fuel allows (2e9, ~0.7 s here): the device's limit and the
# gateways' policy both raised, as an owner would for long jobs.
FUEL = 40_000_000_000
LIMITS = WasmLimits(fuel=FUEL)


@pytest.fixture
def policy(tmp_path: Path) -> str:
    path = tmp_path / "long-runs.toml"
    path.write_text(f"[wasm]\nfuel = {FUEL}\n")
    return str(path)


@pytest.fixture(scope="module")
def modules(examples: Path) -> tuple[bytes, bytes]:
    wasm = examples / "wasm"
    migratable = wasm / "hashchain.migratable.wasm"
    if not migratable.exists():
        pytest.skip("no instrumented examples: Binaryen's wasm-opt is not installed")
    return (wasm / "hashchain.wasm").read_bytes(), migratable.read_bytes()


def _reference(plain: bytes, stdin: bytes, args: list[str]) -> tuple[int, bytes]:
    runtime = WasmRuntime(wasi_nn=None)
    try:
        sha = hashlib.sha256(plain).hexdigest()
        outcome = runtime.run(sha, stdin=stdin, args=args, wasm=plain, limits=LIMITS)
    finally:
        runtime.close()
    return outcome.exit_code, outcome.stdout


def test_a_run_moves_device_gateway_peer_device_at_random_points_with_identical_output(
    make_gateway: Callable[..., GatewayProcess], modules: tuple[bytes, bytes], policy: str
) -> None:
    plain, migratable = modules
    gw_a, gw_b = (
        make_gateway("--policy", policy, managed=True),
        make_gateway("--policy", policy, managed=True),
    )
    rng = random.Random(20261203)
    moved_everywhere = 0
    with gw_a.client(placement="auto") as device, gw_b.client() as peer:
        for trial in range(TRIALS):
            stdin = rng.randbytes(STDIN_BYTES)
            expected = _reference(plain, stdin, [ROUNDS])
            run = device.start_wasm(
                migratable, stdin=stdin, args=[ROUNDS], where="local", limits=LIMITS
            )
            for target in ("edge", peer, "local"):
                time.sleep(rng.uniform(0.0, 0.15))
                run.migrate(target)  # type: ignore[arg-type]
            outcome = run.result(120)
            assert (outcome.exit_code, outcome.stdout) == expected, f"trial {trial}"
            places = [hop.where for hop in outcome.hops]
            if places == ["local", gw_a.gateway_id, gw_b.gateway_id, "local"]:
                moved_everywhere += 1
            else:  # it finished before every move: a prefix of the route, never anything else
                assert (
                    places == ["local", gw_a.gateway_id, gw_b.gateway_id, "local"][: len(places)]
                ), f"trial {trial}: {places}"
    # Most trials went the whole way; every one ended with the output of a run that never moved.
    assert moved_everywhere >= TRIALS * 0.8, f"{moved_everywhere} of {TRIALS} made all hops"


def test_sigterm_sends_three_runs_back_to_their_devices(
    make_gateway: Callable[..., GatewayProcess], modules: tuple[bytes, bytes], policy: str
) -> None:
    plain, migratable = modules
    gw = make_gateway("--workers", "3", "--policy", policy, managed=True)
    stdin = random.Random(3).randbytes(STDIN_BYTES)
    expected = _reference(plain, stdin, [ROUNDS])
    with gw.client(placement="auto") as device:
        runs = [
            device.start_wasm(migratable, stdin=stdin, args=[ROUNDS], where="edge", limits=LIMITS)
            for _ in range(3)
        ]
        assert wait_until(lambda: all(r.where == gw.gateway_id for r in runs), timeout_s=20)
        time.sleep(0.3)
        started = time.monotonic()
        assert gw.stop(timeout_s=30) == 0
        stop_s = time.monotonic() - started
        outcomes = [run.result(120) for run in runs]
    for outcome in outcomes:
        assert (outcome.exit_code, outcome.stdout) == expected
        assert [h.where for h in outcome.hops] == [gw.gateway_id, "local"]
        assert outcome.hops[-1].reason == "gateway stopping"
    # The runs did not hold the shutdown up: far less than the time they still needed.
    assert stop_s < 10, f"the gateway took {stop_s:.1f} s to stop"


def test_sigkill_mid_run_resumes_from_the_last_checkpoint(
    make_gateway: Callable[..., GatewayProcess], modules: tuple[bytes, bytes], policy: str
) -> None:
    plain, migratable = modules
    gw = make_gateway("--policy", policy, managed=True)
    stdin = random.Random(4).randbytes(STDIN_BYTES * 2)
    expected = _reference(plain, stdin, [ROUNDS])
    interval_s = 0.25
    with gw.client(placement="auto", timeout_s=5) as device:
        run = device.start_wasm(
            migratable,
            stdin=stdin,
            args=[ROUNDS],
            where="edge",
            checkpoint_every_s=interval_s,
            limits=LIMITS,
        )
        assert wait_until(lambda: run.checkpoints >= 3, timeout_s=30), "no checkpoints came"
        gw.kill()
        killed_at = time.monotonic()
        last_checkpoint_at = run.last_checkpoint_at
        outcome = run.result(120)
    assert (outcome.exit_code, outcome.stdout) == expected
    assert outcome.hops[-1].where == "local"
    assert outcome.hops[-1].reason.startswith("gateway lost")
    # What is done again is the work since the last checkpoint: at most one interval (plus
    # the time the checkpoint took to arrive).
    assert killed_at - last_checkpoint_at <= interval_s + 0.25


def test_a_gateway_checkpoints_by_mib_of_progress_and_a_killed_run_resumes_from_one(
    make_gateway: Callable[..., GatewayProcess], modules: tuple[bytes, bytes], tmp_path: Path
) -> None:
    """The policy's [migration] checkpoint_every_mib: with the seconds an hour apart, the run's
    I/O progress alone brings its checkpoints, and after a SIGKILL the device goes on from the
    last of them with the output of a run that never stopped."""
    plain, migratable = modules
    policy = tmp_path / "by-progress.toml"
    policy.write_text(
        f"[wasm]\nfuel = {FUEL}\n[migration]\ncheckpoint_every_s = 3600\n"
        "checkpoint_every_mib = 0.0625\n"
    )
    gw = make_gateway("--policy", str(policy), managed=True)
    stdin = random.Random(6).randbytes(STDIN_BYTES * 2)
    expected = _reference(plain, stdin, [ROUNDS])
    with gw.client(placement="auto", timeout_s=5) as device:
        run = device.start_wasm(migratable, stdin=stdin, args=[ROUNDS], where="edge", limits=LIMITS)
        assert wait_until(lambda: run.checkpoints >= 2, timeout_s=30), "no checkpoints came"
        gw.kill()
        outcome = run.result(120)
    assert (outcome.exit_code, outcome.stdout) == expected
    assert outcome.hops[-1].where == "local"
    assert outcome.hops[-1].reason.startswith("gateway lost")


def test_a_private_run_never_goes_to_a_cloud_tier_and_a_public_one_may(
    make_gateway: Callable[..., GatewayProcess], modules: tuple[bytes, bytes]
) -> None:
    plain, migratable = modules
    cloud = make_gateway("--tier", "cloud", managed=True)
    stdin = random.Random(5).randbytes(16 * 1024)
    expected = _reference(plain, stdin, ["10"])
    with cloud.client(placement="auto") as device:
        with pytest.raises(JobError) as refused:
            device.start_wasm(migratable, stdin=stdin, args=["10"], where="edge")
        assert refused.value.code is ErrorCode.FORBIDDEN
        # Started here, it is not moved there either: the move is refused, it finishes here.
        run = device.start_wasm(migratable, stdin=stdin, args=["10"], where="local")
        run.migrate("edge")
        outcome = run.result(60)
        assert (outcome.exit_code, outcome.stdout) == expected
        assert cloud.gateway_id not in [h.where for h in outcome.hops]
        public = device.start_wasm(
            migratable, stdin=stdin, args=["10"], where="edge", data_class="public"
        )
        outcome = public.result(60)
        assert (outcome.exit_code, outcome.stdout) == expected
        assert outcome.hops[0].where == cloud.gateway_id


def _snapshot_of(migratable: bytes, stdin: bytes) -> bytes:
    """A real snapshot of hashchain paused at its first migration point."""
    wasm = WasmRuntime(wasi_nn=None)
    try:
        runtime = MigratableRuntime(wasm)
        sha = hashlib.sha256(migratable).hexdigest()
        run = runtime.start(sha, stdin=stdin, args=["10"], run_id="r-bad", wasm=migratable)
        run.pause()
        outcome = run.execute()
        assert isinstance(outcome, Paused)
        return encode_snapshot(outcome.snapshot)
    finally:
        wasm.close()


def test_bad_snapshots_get_their_error_codes_and_the_gateway_serves_on(
    gateway: GatewayProcess, wasm: dict[str, Path], modules: tuple[bytes, bytes]
) -> None:
    _, migratable = modules
    module_sha = hashlib.sha256(migratable).hexdigest()
    good = _snapshot_of(migratable, b"x" * 10_000)
    other = hashlib.sha256(b"another module").hexdigest()
    header = len(SNAPSHOT_MAGIC) + 2
    finished_run = _finished_snapshot(migratable)
    cases: dict[str, tuple[bytes, str, str]] = {
        # name: (snapshot bytes, module named in run_resume, expected code)
        "truncated": (good[: len(good) // 2], module_sha, ErrorCode.BAD_SNAPSHOT),
        "not a snapshot": (b"hello, world" * 10, module_sha, ErrorCode.BAD_SNAPSHOT),
        "newer format": (
            SNAPSHOT_MAGIC + struct.pack(">H", 99) + good[header:],
            module_sha,
            ErrorCode.UNSUPPORTED_VERSION,
        ),
        "another module": (_rebound(good, other), module_sha, ErrorCode.SNAPSHOT_MISMATCH),
        "finished run": (finished_run, module_sha, ErrorCode.RUN_FINISHED),
    }
    with gateway.client() as device:
        conn = device.connection()
        device.upload_blob(conn, migratable, 1 << 20, "private")
        for name, (data, module, code) in cases.items():
            device.upload_blob(conn, data, 1 << 20, "private")
            resume = RunResume(
                job_id=f"j-{uuid.uuid4().hex[:8]}",
                run_id="r-bad",
                module=module,
                snapshot=snapshot_sha256(data),
            )
            reply = conn.request(resume, uuid.uuid4().bytes, 20)
            assert isinstance(reply, Error), f"{name}: {reply}"
            assert reply.code is code, f"{name}: {reply.code} {reply.message}"
        # A snapshot whose bytes are not what its name says never gets stored.
        with pytest.raises(JobError) as mismatch:
            device._offload.uploads.ensure(
                conn,
                _blob(b"tampered", hashlib.sha256(good).hexdigest()),
                1 << 20,
                "private",
                time.monotonic(),
            ).result()
        assert mismatch.value.code is ErrorCode.HASH_MISMATCH
        # No run is left behind, and the next good request works.
        control = RunControl(run_id="r-bad", action="migrate")
        assert isinstance(conn.request(control, uuid.uuid4().bytes, 10), Error)
        ok = device.run_wasm(wasm["echo"], b"still here")
        assert ok.stdout.startswith(b"still here")
        good_start = RunStart(
            job_id=f"j-{uuid.uuid4().hex[:8]}",
            run_id="r-good",
            module=module_sha,
            args=["1"],
            stdin=b"y" * 5000,
        )
        assert isinstance(conn.request(good_start, uuid.uuid4().bytes, 30), RunResult)


def _finished_snapshot(migratable: bytes) -> bytes:
    from hearth.runtime.snapshot import decode_snapshot

    snap = decode_snapshot(_snapshot_of(migratable, b"z" * 5000))
    snap.finished, snap.exit_code = True, 0
    return encode_snapshot(snap)


def _rebound(data: bytes, module: str) -> bytes:
    """The same snapshot, made for another module."""
    from hearth.runtime.snapshot import decode_snapshot

    snap = decode_snapshot(data)
    snap.module = module
    return encode_snapshot(snap)


def _blob(data: bytes, sha256: str) -> object:
    from hearth._blobs import Blob

    return Blob(data, sha256)


def test_run_control_of_an_unknown_run_is_no_run_and_of_a_known_one_is_acked(
    make_gateway: Callable[..., GatewayProcess], modules: tuple[bytes, bytes], policy: str
) -> None:
    _, migratable = modules
    gateway = make_gateway("--policy", policy)
    with gateway.client() as device:
        conn = device.connection()
        reply = conn.request(RunControl(run_id="nobody", action="checkpoint"), b"c-1", 10)
        assert isinstance(reply, Error)
        assert reply.code is ErrorCode.NO_RUN
        stdin = random.Random(6).randbytes(STDIN_BYTES * 4)
        run = device.start_wasm(migratable, stdin=stdin, args=[ROUNDS], limits=LIMITS)
        # run.where names the gateway as soon as the run is on its way (its module may still be
        # uploading): until the gateway has accepted it, a control is answered no_run.
        acks: list[object] = []

        def acked() -> bool:
            control = RunControl(run_id=run.run_id, action="checkpoint")
            acks.append(conn.request(control, uuid.uuid4().bytes, 10))
            return isinstance(acks[-1], RunAck)

        assert wait_until(acked, timeout_s=20, step_s=0.1), acks[-1]
        assert all(isinstance(a, RunAck) or a.code is ErrorCode.NO_RUN for a in acks)  # type: ignore[attr-defined]
        assert wait_until(lambda: run.checkpoints >= 1, timeout_s=10)
        run.cancel()
        with pytest.raises(JobError) as cancelled:
            run.result(30)
        assert cancelled.value.code is ErrorCode.CANCELLED
