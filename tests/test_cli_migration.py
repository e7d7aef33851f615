"""`hearth run --migratable`, `hearth migrate` and `hearth resume`, as a person would use them:
the CLI as a subprocess against a real gateway, signals and all."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from testkit.gateway import GatewayProcess
from testkit.wait import wait_until

# hashchain over 2 MB, 700 rounds per 4 KiB chunk: ~15e9 instructions, a few seconds, long
# enough to be moved or stopped half-way, and more than the default 2e9 fuel: the gateway gets
# a policy with more, the device --fuel.
ROUNDS = "700"
FUEL = "1e11"


def _env(tmp_path: Path) -> dict[str, str]:
    # Pid files and any pairing state under the test's directory, never the user's.
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return {
        **os.environ,
        "XDG_RUNTIME_DIR": str(runtime),
        "HEARTH_CONFIG_DIR": str(tmp_path / "config"),
    }


def _hearth(
    tmp_path: Path, *args: str, stdin: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    with (stdin or Path(os.devnull)).open("rb") as data:
        return subprocess.run(
            [sys.executable, "-m", "hearth.cli", *args],
            stdin=data,
            capture_output=True,
            timeout=180,
            env=_env(tmp_path),
            check=False,
        )


def _start(tmp_path: Path, *args: str, stdin: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`hearth ARGS` in the background, and the run id from its first stderr line."""
    with stdin.open("rb") as data:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hearth.cli", *args],
            stdin=data,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(tmp_path),
        )
    assert proc.stderr is not None
    first = proc.stderr.readline().decode()
    assert first.startswith("hearth: run "), first
    return proc, first.split()[2]


@pytest.fixture
def long_gateway(make_gateway: Callable[..., GatewayProcess], tmp_path: Path) -> GatewayProcess:
    policy = tmp_path / "fuel.toml"
    policy.write_text(f"[wasm]\nfuel = {int(float(FUEL))}\n")
    return make_gateway("--policy", str(policy))


@pytest.fixture
def chain_input(tmp_path: Path) -> Path:
    path = tmp_path / "chain.in"
    path.write_bytes(random.Random(11).randbytes(2_000_000))
    return path


def test_a_migratable_run_moved_by_hearth_migrate_prints_what_a_plain_run_prints(
    long_gateway, wasm, chain_input, tmp_path: Path
) -> None:
    gw = ["--gateway", long_gateway.address]
    plain = _hearth(
        tmp_path, "run", *gw, "--where", "edge", str(wasm["hashchain"]), ROUNDS, stdin=chain_input
    )
    assert plain.returncode == 0, plain.stderr
    assert b"final: 489 chunks" in plain.stdout

    proc, run_id = _start(
        tmp_path,
        "run",
        "--migratable",
        *gw,
        "--where",
        "local",
        "--fuel",
        FUEL,
        "--explain",
        str(wasm["hashchain.migratable"]),
        ROUNDS,
        stdin=chain_input,
    )
    pid_file = tmp_path / "xdg-runtime" / "hearth" / "runs" / f"{run_id}.pid"
    assert pid_file.read_text().split() == [str(proc.pid), run_id]
    moved = _hearth(tmp_path, "migrate", run_id, "--to", "edge")
    assert moved.returncode == 0, moved.stderr
    stdout, stderr = proc.communicate(timeout=180)

    assert proc.returncode == 0, stderr
    assert stdout == plain.stdout
    assert b"hop 1: local: placement=local" in stderr
    assert f"hop 2: {long_gateway.gateway_id}: moved to edge by SIGUSR1".encode() in stderr
    assert not pid_file.exists()


def test_sigterm_pauses_into_the_checkpoint_file_and_resume_finishes_the_run(
    long_gateway, wasm, chain_input, tmp_path: Path
) -> None:
    snap = tmp_path / "run.snap"
    gw = ["--gateway", long_gateway.address]
    proc, run_id = _start(
        tmp_path,
        "run",
        "--migratable",
        *gw,
        "--where",
        "edge",
        "--explain",
        "--checkpoint-to",
        str(snap),
        "--checkpoint-every",
        "0.3",
        str(wasm["hashchain.migratable"]),
        ROUNDS,
        stdin=chain_input,
    )
    # The first checkpoint comes from the gateway; the pause, too, goes through it.
    assert wait_until(snap.exists, timeout_s=60), "no checkpoint written"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stdout == b""  # what it printed so far is in the snapshot, printed by the resume
    assert f"run {run_id} paused; continue it with: hearth resume {snap}".encode() in stderr
    assert f"hop 1: {long_gateway.gateway_id}: placement=edge".encode() in stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.snap")] == []

    # The plain module does too: instrumented again here, it is the same bytes.
    resumed = _hearth(
        tmp_path,
        "resume",
        str(snap),
        "--module",
        str(wasm["hashchain"]),
        *gw,
        "--where",
        "local",
        "--fuel",
        FUEL,
        "--explain",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert b"finished on local" in resumed.stderr
    whole = _hearth(
        tmp_path, "run", *gw, "--where", "edge", str(wasm["hashchain"]), ROUNDS, stdin=chain_input
    )
    assert resumed.stdout == whole.stdout
    assert b"final: 489 chunks" in resumed.stdout


def test_migrate_of_an_unknown_run_exits_2(tmp_path: Path) -> None:
    result = _hearth(tmp_path, "migrate", "run-nosuchrun0", "--to", "edge")
    assert result.returncode == 2
    assert b"no run run-nosuchrun0" in result.stderr


def test_migrate_of_a_run_whose_process_has_ended_exits_2(tmp_path: Path) -> None:
    stale = tmp_path / "xdg-runtime" / "hearth" / "runs"
    stale.mkdir(parents=True)
    (stale / "run-gone.pid").write_text("999999999\nrun-gone\n")  # past any pid_max
    result = _hearth(tmp_path, "migrate", "run-gone", "--to", "local")
    assert result.returncode == 2
    assert b"no run run-gone" in result.stderr


def test_a_migratable_run_that_traps_exits_125(gateway, wasm, tmp_path: Path) -> None:
    result = _hearth(
        tmp_path,
        "run",
        "--migratable",
        "--gateway",
        gateway.address,
        "--where",
        "edge",
        str(wasm["trap.migratable"]),
    )
    assert result.returncode == 125
    assert b"trap" in result.stderr
