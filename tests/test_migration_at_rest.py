"""A migratable run's snapshots are sealed at rest on the gateway (docs/migration.md §9): the
bytes the gateway keeps on disk for a run that moved to it never hold the run's state in the
clear, and the run resumes from them all the same. Against a real gateway on 127.0.0.1."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import GatewayProcess, wait_until
from hearth.runtime.limits import WasmLimits
from hearth.runtime.snapshot import SNAPSHOT_MAGIC, decode_snapshot, snapshot_sha256
from hearth.runtime.wasm import WasmRuntime
from hearth_gateway.sealed_file import is_sealed

pytestmark = pytest.mark.slow

FUEL = 40_000_000_000
LIMITS = WasmLimits(fuel=FUEL)
ROUNDS = "600"


@pytest.fixture(scope="module")
def modules(examples: Path) -> tuple[bytes, bytes]:
    wasm = examples / "wasm"
    migratable = wasm / "hashchain.migratable.wasm"
    if not migratable.exists():
        pytest.skip("no instrumented examples: Binaryen's wasm-opt is not installed")
    return (wasm / "hashchain.wasm").read_bytes(), migratable.read_bytes()


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_a_snapshot_stored_by_the_gateway_is_sealed_and_the_run_resumes_from_it(
    make_gateway: Callable[..., GatewayProcess], modules: tuple[bytes, bytes], tmp_path: Path
) -> None:
    plain, migratable = modules
    policy = tmp_path / "long-runs.toml"
    policy.write_text(f"[wasm]\nfuel = {FUEL}\n")
    gw = make_gateway("--policy", str(policy), managed=True)
    # Random input: stored blocks in the snapshot's zlib stream, so a plaintext snapshot on
    # disk would show any 32 bytes of the input not yet read, verbatim.
    stdin = random.Random(9).randbytes(512 * 1024)
    marker = stdin[-64:-32]
    expected = WasmRuntime(wasi_nn=None).run(
        hashlib.sha256(plain).hexdigest(), stdin=stdin, args=[ROUNDS], wasm=plain, limits=LIMITS
    )
    snapshots: list[bytes] = []
    with gw.client(placement="auto") as device:
        run = device.start_wasm(
            migratable, stdin=stdin, args=[ROUNDS], where="local", limits=LIMITS
        )
        run.on_snapshot = snapshots.append
        assert wait_until(lambda: run.where == "local", timeout_s=20)
        assert run.migrate("edge") == gw.gateway_id  # the snapshot goes up as a blob
        outcome = run.result(120)
    assert (outcome.exit_code, outcome.stdout) == (expected.exit_code, expected.stdout)
    assert [h.where for h in outcome.hops] == ["local", gw.gateway_id]
    # The snapshot the gateway resumed from held the marker in the clear (the test would see
    # it on disk, were it stored so) ...
    uploaded = snapshots[0]
    assert uploaded.startswith(SNAPSHOT_MAGIC)
    assert marker in uploaded
    decode_snapshot(uploaded)
    sha = snapshot_sha256(uploaded)
    stored = gw.state_dir / "blobs" / sha[:2] / sha
    assert stored.is_file(), "the gateway did not keep the snapshot blob"
    assert is_sealed(stored.read_bytes()[:16])
    assert gw.stop(timeout_s=30) == 0  # the journal and the broker's store written out
    # ... and nothing the gateway keeps, anywhere in its state directory, does.
    for path in _files(gw.state_dir):
        data = path.read_bytes()
        assert SNAPSHOT_MAGIC not in data, f"a plaintext snapshot in {path}"
        assert marker not in data, f"the run's input in the clear in {path}"


def test_a_sealed_file_opens_only_whole_in_order_and_with_its_key(tmp_path: Path) -> None:
    from hearth.errors import ErrorCode, JobError
    from hearth_gateway.sealed_file import SealedWriter, open_sealed

    key, other = bytes(range(32)), bytes(32)
    writer = SealedWriter(key)
    records = [writer.record(piece) for piece in (b"first ", b"second ", b"third")]
    path = tmp_path / "sealed"
    path.write_bytes(writer.header() + b"".join(records))
    assert open_sealed(path, key) == b"first second third"
    for bad, what in (
        (writer.header() + records[1] + records[0] + records[2], "records swapped"),
        (writer.header() + b"".join(records)[:-5], "cut short"),
    ):
        path.write_bytes(bad)
        with pytest.raises(JobError) as refused:
            open_sealed(path, key)
        assert refused.value.code is ErrorCode.BAD_SNAPSHOT, what
    path.write_bytes(writer.header() + b"".join(records))
    with pytest.raises(JobError):
        open_sealed(path, other)


# -- snapshots larger than one message leave a gateway in pieces ------------------------------


def test_a_snapshot_larger_than_a_message_leaves_the_gateway_in_run_chunk_pieces(
    make_gateway: Callable[..., GatewayProcess], modules: tuple[bytes, bytes], tmp_path: Path
) -> None:
    """With messages limited to 1 MiB, a run holding 3 MiB of input moves to the gateway (the
    snapshot is uploaded as a blob), sends checkpoints and comes back (both larger than a
    message: run_chunk pieces), and ends with the output of a run that never moved."""
    plain, migratable = modules
    policy = tmp_path / "small-messages.toml"
    policy.write_text(
        f"[wasm]\nfuel = {FUEL}\n[limits]\nmax_message_bytes = 1048576\nmax_chunk_bytes = 262144\n"
    )
    gw = make_gateway("--policy", str(policy), managed=True)
    stdin = random.Random(12).randbytes(3 << 20)
    rounds = "200"  # ~3 s of work here: it is still running when it is moved back
    expected = WasmRuntime(wasi_nn=None).run(
        hashlib.sha256(plain).hexdigest(), stdin=stdin, args=[rounds], wasm=plain, limits=LIMITS
    )
    sizes: list[int] = []
    with gw.client(placement="auto") as device:
        run = device.start_wasm(
            migratable,
            stdin=stdin,
            args=[rounds],
            where="local",
            limits=LIMITS,
            checkpoint_every_s=0.2,
        )
        run.on_snapshot = lambda blob: sizes.append(len(blob))
        assert wait_until(lambda: run.where == "local", timeout_s=20)
        assert run.migrate("edge") == gw.gateway_id
        came = run.checkpoints
        assert wait_until(lambda: run.checkpoints >= came + 2 or run.done(), timeout_s=30)
        assert run.migrate("local") == "local"
        outcome = run.result(120)
    assert (outcome.exit_code, outcome.stdout) == (expected.exit_code, expected.stdout)
    assert [h.where for h in outcome.hops] == ["local", gw.gateway_id, "local"]
    assert outcome.hops[-1].reason == "moved by the application to local"
    # Every snapshot the device got from the gateway was larger than one message.
    assert len(sizes) >= 3
    assert min(sizes[1:]) > 1 << 20


def test_pieces_of_a_snapshot_come_back_whole_and_only_whole() -> None:
    from hearth.migration import SnapshotPieces
    from hearth.protocol import RunChunk, RunMoved, decode_reply, encode
    from hearth_gateway.runs import in_pieces

    snapshot = random.Random(13).randbytes(10_000)
    moved = encode(RunMoved(job_id="r.2", run_id="r", snapshot=snapshot, reason="x"))
    assert in_pieces(moved, max_message=len(moved), max_chunk=4096) is None  # it fits
    pieces = [decode_reply(p) for p in in_pieces(moved, max_message=1024, max_chunk=4096) or []]
    *chunks, last = pieces
    assert [len(c.data) for c in chunks if isinstance(c, RunChunk)] == [4096, 4096, 1808]
    assert isinstance(last, RunMoved)
    assert last.snapshot == b""
    assert last.snapshot_sha256 == hashlib.sha256(snapshot).hexdigest()
    whole = SnapshotPieces()
    for chunk in chunks:
        assert isinstance(chunk, RunChunk)
        whole.add(chunk)
    assert whole.take(last.snapshot_sha256) == snapshot
    gap = SnapshotPieces()
    for chunk in (chunks[0], chunks[2]):  # one lost on the way
        assert isinstance(chunk, RunChunk)
        gap.add(chunk)
    assert gap.take(last.snapshot_sha256) == b""
