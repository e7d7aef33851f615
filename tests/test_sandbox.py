"""The WASM filesystem sandbox: each run gets a fresh, empty /scratch and nothing else; every
way out (other paths, "..", symlinks, sockets) fails cleanly inside the module; the scratch
directory is gone when the job ends, also after a crash. Locally (the SDK) and through a real
gateway (examples/wasm/scratch.c)."""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

import hearth
from hearth.errors import ErrorCode, JobError
from hearth.protocol import BlobStored, Error, WasmJob, WasmResult
from hearth.runtime.limits import WasmLimits
from hearth.runtime.wasm import WasmRuntime
from helpers import RawDevice
from testkit.gateway import GatewayProcess
from testkit.wait import wait_until

# What examples/wasm/scratch.c reports, errno text aside: /scratch works, nothing else does.
REPORT = [
    "scratch empty at start: ok",
    "scratch write and read back: ok",
    "scratch subdirectory: ok",
    "read /etc/passwd: denied",
    "read ../etc/passwd: denied",
    "read /scratch/../../etc/passwd: denied",
    "list /scratch/..: denied",
    "list /: denied",
    "create /tmp/hearth-escape: denied",
    "read /proc/self/environ: denied",
    "follow symlink to /etc/passwd: denied",
    "follow symlink to ../../etc: denied",
    "accept on any descriptor: denied",
    "send on stdout: denied",
]

# WasmEdge's socket extension: a module asking for it must be refused before it runs.
SOCK_OPEN = """
(module
  (import "wasi_snapshot_preview1" "sock_open" (func $sock_open (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $sock_open (i32.const 1) (i32.const 1) (i32.const 0)))))
"""

# Could open files in /scratch (it imports path_open) but never does.
FINDS_SCRATCH = """
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")))
"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _report(stdout: bytes) -> list[str]:
    # "denied (Operation not permitted)" -> "denied": the errno differs by path, not the verdict.
    return [line.split(" (")[0] for line in stdout.decode().splitlines()]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if not p.is_dir()) if root.exists() else []


@pytest.fixture
def scratch_root(tmp_path: Path) -> Path:
    return tmp_path / "scratch"


@pytest.fixture
def runtime(scratch_root: Path) -> Iterator[WasmRuntime]:
    rt = WasmRuntime(scratch_root=scratch_root, wasi_nn=None)
    yield rt
    rt.close()


# -- local: the SDK runtime ----------------------------------------------------------------------


def test_scratch_works_and_every_way_out_fails_cleanly(
    runtime: WasmRuntime, scratch_root: Path, wasm: dict[str, Path]
) -> None:
    data = wasm["scratch"].read_bytes()
    for _ in range(2):  # the second run finds an empty /scratch again
        out = runtime.run(_sha(data), wasm=data)
        assert out.exit_code == 0, out.stderr
        assert _report(out.stdout) == REPORT
        assert list(scratch_root.iterdir()) == []  # removed when the run ended


def test_scratch_over_its_limit_fails_the_run_and_is_removed(
    runtime: WasmRuntime, scratch_root: Path, wasm: dict[str, Path]
) -> None:
    data = wasm["scratch"].read_bytes()
    limits = WasmLimits(scratch_bytes=1_000_000)
    ok = runtime.run(_sha(data), wasm=data, args=["fill", "1000000"], limits=limits)
    assert ok.stdout == b"fill: 1000000 bytes\n"
    with pytest.raises(JobError) as err:
        runtime.run(_sha(data), wasm=data, args=["fill", "1000001"], limits=limits)
    assert err.value.code == ErrorCode.OUTPUT_LIMIT
    assert list(scratch_root.iterdir()) == []


def test_scratch_is_removed_when_the_run_fails(
    runtime: WasmRuntime, scratch_root: Path, wasm: dict[str, Path]
) -> None:
    data = wasm["scratch"].read_bytes()
    with pytest.raises(JobError) as err:  # writes /scratch/held, then spins out of fuel
        runtime.run(_sha(data), wasm=data, args=["hold"], limits=WasmLimits(fuel=50_000_000))
    assert err.value.code == ErrorCode.TIMEOUT
    assert list(scratch_root.iterdir()) == []


def test_a_module_importing_a_socket_call_is_refused(
    runtime: WasmRuntime, scratch_root: Path
) -> None:
    data = wasmtime.wat2wasm(SOCK_OPEN)
    with pytest.raises(JobError) as err:
        runtime.run(_sha(data), wasm=data)
    assert err.value.code == ErrorCode.INVALID_MODULE
    assert "sock_open" in err.value.message
    assert _files(scratch_root) == []


def test_an_untouched_scratch_is_reused_and_a_used_one_is_not(
    runtime: WasmRuntime, scratch_root: Path, wasm: dict[str, Path]
) -> None:
    noop = wasm["noop"].read_bytes()
    runtime.run(_sha(noop), wasm=noop)
    assert list(scratch_root.iterdir()) == []  # imports nothing that could reach one: none
    idle = wasmtime.wat2wasm(FINDS_SCRATCH)
    for _ in range(3):
        runtime.run(_sha(idle), wasm=idle)
    (kept,) = scratch_root.iterdir()  # one directory for all three: nothing was written
    assert list(kept.iterdir()) == []
    data = wasm["scratch"].read_bytes()
    assert _report(runtime.run(_sha(data), wasm=data).stdout) == REPORT
    assert not kept.exists()  # written to: removed with what the run left there
    runtime.run(_sha(idle), wasm=idle)
    runtime.close()
    assert list(scratch_root.iterdir()) == []


def test_client_local_runs_get_a_temporary_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wasm: dict[str, Path]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with hearth.Client("127.0.0.1:1", placement="local", timeout_s=1.0) as client:
        run = client.run_wasm(wasm["scratch"])
    assert run.where == "local"
    assert _report(run.stdout) == REPORT
    assert list(tmp_path.glob("hearth-scratch-*")) == []


# -- through a real gateway ----------------------------------------------------------------------


def test_gateway_jobs_get_a_scratch_that_is_gone_afterwards(
    gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    with gateway.client() as client:
        runs = [client.run_wasm(wasm["scratch"]) for _ in range(2)]
    for run in runs:
        assert run.where == "edge"
        assert run.exit_code == 0
        assert _report(run.stdout) == REPORT
    root = gateway.state_dir / "scratch"
    assert root.is_dir()
    assert _files(root) == []
    # One directory per worker, named by pid; no job directory survives its job.
    assert all(p.name.isdigit() and list(p.iterdir()) == [] for p in root.iterdir())


def test_gateway_scratch_limit_comes_from_the_policy(
    make_gateway, tmp_path: Path, wasm: dict[str, Path]
) -> None:
    policy = tmp_path / "scratch.toml"
    policy.write_text("[wasm]\nscratch_bytes = 100_000\n")
    gateway = make_gateway("--policy", str(policy))
    with gateway.client() as client:
        assert client.run_wasm(wasm["scratch"], args=["fill", "100000"]).exit_code == 0
        with pytest.raises(JobError) as err:
            client.run_wasm(wasm["scratch"], args=["fill", "100001"])
    assert err.value.code == ErrorCode.OUTPUT_LIMIT
    assert _files(gateway.state_dir / "scratch") == []


def test_gateway_socket_import_is_refused(gateway: GatewayProcess) -> None:
    data = wasmtime.wat2wasm(SOCK_OPEN)
    with RawDevice(gateway.listen, gateway.gateway_id) as dev:
        assert isinstance(dev.upload(data), BlobStored)
        reply = dev.request(WasmJob(job_id="sock", module=_sha(data)))
    assert isinstance(reply, Error), reply
    assert reply.code == ErrorCode.INVALID_MODULE


def test_a_killed_workers_scratch_is_removed_by_the_next_worker(
    make_gateway, tmp_path: Path, wasm: dict[str, Path]
) -> None:
    policy = tmp_path / "long.toml"
    policy.write_text("[wasm]\nfuel = 100_000_000_000\n")  # `hold` spins for tens of seconds
    gateway = make_gateway("--policy", str(policy), start=False)
    # Left by a worker of an earlier run of the daemon (a pid above any pid_max: surely gone).
    stale = gateway.state_dir / "scratch" / "4194305" / "hearth-scratch-old"
    stale.mkdir(parents=True)
    (stale / "private.bin").write_bytes(b"left behind")
    gateway.start()
    assert wait_until(lambda: not stale.parent.exists(), timeout_s=10)

    data = wasm["scratch"].read_bytes()
    root = gateway.state_dir / "scratch"
    with RawDevice(gateway.listen, gateway.gateway_id) as dev:
        assert isinstance(dev.upload(data), BlobStored)
        correlation = dev.send(WasmJob(job_id="victim", module=_sha(data), args=["hold"]))
        assert wait_until(lambda: any(p.name == "held" for p in _files(root)), timeout_s=20)
        (held,) = [p for p in _files(root) if p.name == "held"]
        worker_dir = held.parent.parent
        os.kill(int(worker_dir.name), signal.SIGKILL)  # a native crash mid-job
        reply = dev.request(WasmJob(job_id="after", module=_sha(data)), timeout_s=30)
        assert isinstance(reply, WasmResult)
        assert _report(reply.stdout) == REPORT
        crashed = dev.reply(correlation, timeout_s=30)
    assert isinstance(crashed, Error)
    assert crashed.code == ErrorCode.WORKER_CRASHED
    assert wait_until(lambda: not worker_dir.exists(), timeout_s=20)
    assert _files(root) == []
