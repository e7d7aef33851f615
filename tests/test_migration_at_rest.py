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
