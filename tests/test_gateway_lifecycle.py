"""The daemon's life: managed broker, SIGTERM, crash recovery from the journal, worker
replacement, and what `hearth-gateway status` shows."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hearth.errors import ErrorCode
from hearth.protocol import BlobStored, Error, WasmJob, WasmResult
from helpers import RawDevice
from testkit.gateway import GatewayProcess
from testkit.wait import wait_until


def test_managed_broker_runs_and_stops_with_the_gateway(make_gateway, wasm) -> None:
    gw = make_gateway(managed=True)
    snap = gw.snapshot()
    assert snap.managed_broker
    assert snap.broker_pid
    with gw.client() as client:
        assert client.run_wasm(wasm["echo"], stdin=b"hi").stdout == b"hi"
    assert gw.stop() == 0
    assert wait_until(lambda: not _alive(snap.broker_pid), timeout_s=5)


def test_sigkill_takes_the_managed_broker_and_workers_down_too(make_gateway) -> None:
    gw = make_gateway(managed=True)
    snap = gw.snapshot()
    children = [snap.broker_pid, *snap.worker_pids]
    gw.kill()
    assert wait_until(lambda: not any(_alive(pid) for pid in children), timeout_s=10)


def test_sigterm_finishes_in_flight_jobs_goes_offline_and_exits_0(
    gateway: GatewayProcess, wasm
) -> None:
    module = wasm["mandelbrot"].read_bytes()
    with RawDevice(gateway.listen, gateway.gateway_id) as dev:
        assert isinstance(dev.upload(module), BlobStored)
        sha = hashlib.sha256(module).hexdigest()
        correlation = dev.send(WasmJob(job_id="slow", module=sha, args=["640", "480", "800"]))
        time.sleep(0.3)  # running now
        assert gateway.proc is not None
        gateway.proc.send_signal(signal.SIGTERM)
        reply = dev.reply(correlation, timeout_s=30)
        assert isinstance(reply, WasmResult)
        assert reply.exit_code == 0
        assert gateway.proc.wait(timeout=30) == 0
    assert gateway.snapshot().state == "stopped"


def test_jobs_accepted_before_a_crash_are_run_and_answered_after_restart(
    gateway: GatewayProcess, wasm
) -> None:
    module = wasm["mandelbrot"].read_bytes()
    sha = hashlib.sha256(module).hexdigest()
    with RawDevice(gateway.listen, gateway.gateway_id) as dev:
        assert isinstance(dev.upload(module), BlobStored)
        correlations = [
            dev.send(WasmJob(job_id=f"j{i}", module=sha, args=["640", "480", "800"]))
            for i in range(4)
        ]
        time.sleep(0.3)  # accepted and journaled; at most two running
        gateway.kill()
        gateway.start()  # same state dir: the journal is read back
        replies = [dev.reply(c, timeout_s=60) for c in correlations]
    assert all(isinstance(r, WasmResult) and r.exit_code == 0 for r in replies)


def test_a_worker_that_dies_costs_only_its_job(make_gateway, tmp_path, wasm) -> None:
    policy = tmp_path / "long.toml"
    policy.write_text("[wasm]\nfuel = 100_000_000_000\n")  # spin runs for tens of seconds
    gateway = make_gateway("--policy", str(policy))
    spin = wasm["spin"].read_bytes()
    module = wasm["mandelbrot"].read_bytes()
    sha = hashlib.sha256(module).hexdigest()
    with RawDevice(gateway.listen, gateway.gateway_id) as dev:
        assert isinstance(dev.upload(module), BlobStored)
        assert isinstance(dev.upload(spin), BlobStored)
        correlation = dev.send(WasmJob(job_id="victim", module=hashlib.sha256(spin).hexdigest()))
        # Kill only once the job is surely running (on a loaded machine it may queue a while).
        assert wait_until(lambda: gateway.snapshot().busy_workers == 1, timeout_s=15)
        busy = gateway.snapshot().worker_pids
        for pid in busy:  # simulate a native crash in whichever worker runs it
            os.kill(pid, signal.SIGKILL)
        reply = dev.reply(correlation, timeout_s=30)
        assert isinstance(reply, Error)
        assert reply.code == ErrorCode.WORKER_CRASHED
        after = dev.request(WasmJob(job_id="next", module=sha, args=["32", "24", "10"]))
        assert isinstance(after, WasmResult)
        assert after.exit_code == 0
        # Not the job's fault: the same id sent again runs again instead of replaying the error.
        again = dev.send(WasmJob(job_id="victim", module=sha, args=["32", "24", "10"]))
        assert isinstance(dev.reply(again), WasmResult)
    assert wait_until(lambda: gateway.snapshot().worker_restarts >= 1, timeout_s=5)
    assert set(gateway.snapshot().worker_pids).isdisjoint(busy)


def _status(gateway: GatewayProcess, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth_gateway.cli",
            "status",
            "--state-dir",
            str(gateway.state_dir),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_status_command_shows_the_running_gateway(gateway: GatewayProcess) -> None:
    out = _status(gateway, "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["gateway_id"] == gateway.gateway_id
    assert status["state"] == "online"
    assert status["workers"] == 2
    text = _status(gateway).stdout
    assert gateway.gateway_id in text
    assert "workers" in text
    gateway.kill()
    dead = _status(gateway, "--json")
    assert dead.returncode == 3
    assert json.loads(dead.stdout)["state"] == "dead"


def test_bad_config_refuses_to_start(tmp_path) -> None:
    policy = tmp_path / "bad.toml"
    policy.write_text("[wasm]\nfuel = 'lots'\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth_gateway.cli",
            "run",
            "--state-dir",
            str(tmp_path / "s"),
            "--policy",
            str(policy),
            "--no-mdns",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "fuel" in result.stderr


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        # Reaped between kill(0) and the read: a /proc file opened just before the process
        # went fails its read with ESRCH.
        return False


pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def test_workers_have_no_network(gateway: GatewayProcess, wasm) -> None:
    """Kernel-enforced: each worker sits in a network namespace of its own."""
    snap = gateway.snapshot()
    if snap.worker_network != "isolated":
        pytest.skip(f"this kernel gave workers no namespace: {snap.worker_network}")
    assert gateway.proc is not None
    daemon_ns = os.readlink(f"/proc/{gateway.proc.pid}/ns/net")
    for pid in snap.worker_pids:
        assert os.readlink(f"/proc/{pid}/ns/net") != daemon_ns
        # Nothing but a loopback interface, and it is down.
        with open(f"/proc/{pid}/net/dev") as f:
            interfaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
        assert interfaces == ["lo"]
    with gateway.client() as client:  # and jobs still run
        assert client.run_wasm(wasm["echo"], stdin=b"ok").stdout == b"ok"
