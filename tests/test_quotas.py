"""Per-device and per-application quotas (policy ``[quotas]``, docs/quotas.md): enforced by a
real gateway, accounted in its SQLite store, shown by ``hearth-gateway usage`` and the device's
``usage`` request; ``auto`` placement runs a refused call on the device. Bad quota values stop
the gateway at start."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

import hearth
from hearth.cli import main as cli_main
from hearth.errors import ErrorCode, QuotaExceeded
from hearth.protocol import Error, TaskInstall, Trigger, WasmJob, WasmResult
from hearth_gateway.errors import ConfigError
from hearth_gateway.policy import QuotaLimits, QuotasPolicy, load_policy
from hearth_gateway.quota import next_reset
from helpers import RawDevice
from testkit.gateway import GatewayProcess

PRIMES_LIMIT = "200000"  # a job of some tens of milliseconds of wasm on this machine


def _gateway_with(make_gateway: Callable[..., GatewayProcess], tmp_path: Path, policy: str):
    path = tmp_path / f"quota-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(policy)
    return make_gateway("--policy", str(path))


def _usage_cli(gw: GatewayProcess) -> list[dict[str, object]]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth_gateway.cli",
            "usage",
            "--json",
            "--state-dir",
            str(gw.state_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_an_app_at_its_cpu_quota_is_refused_with_the_reset_time_its_sibling_app_is_not(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, wasm: dict[str, Path]
) -> None:
    gw = _gateway_with(make_gateway, tmp_path, "[quotas.apps.doorcam]\ncpu_s_per_day = 0.3\n")
    device = f"dev-{uuid.uuid4().hex[:8]}"
    run_ms = {"doorcam": 0.0, "thermo": 0.0}
    with hearth.Client(gw.address, client_id=device, app="doorcam", placement="edge") as cam:
        refused = None
        for _ in range(200):
            try:
                run = cam.run_wasm(wasm["primes"], args=[PRIMES_LIMIT])
            except QuotaExceeded as exc:
                refused = exc
                break
            run_ms["doorcam"] += run.timing.run_ms
        assert refused is not None, "never refused"
        cam_usage = cam.usage()
    assert refused.code is ErrorCode.QUOTA_EXCEEDED
    assert refused.quota == "cpu_s_per_day"
    assert refused.resets_at == next_reset(time.time())  # the next UTC midnight
    assert f"application doorcam on device {device}" in refused.message
    assert "resets at" in refused.message
    assert run_ms["doorcam"] / 1e3 >= 0.3  # refused only once at it

    # Another application of the same device is not affected.
    with hearth.Client(gw.address, client_id=device, app="thermo", placement="edge") as thermo:
        for _ in range(3):
            run_ms["thermo"] += thermo.run_wasm(wasm["primes"], args=[PRIMES_LIMIT]).timing.run_ms

    # Usage, as the owner sees it and as the device sees it: the sum of the run times (5 %).
    rows = {row["app"]: row for row in _usage_cli(gw) if row["client_id"] == device}
    assert set(rows) == {"doorcam", "thermo"}
    for app, ms in run_ms.items():
        assert rows[app]["cpu_s"] == pytest.approx(ms / 1e3, rel=0.05), app
    assert rows["thermo"]["jobs"] == 3
    assert {u.app: u.cpu_s for u in cam_usage} == {
        "doorcam": pytest.approx(rows["doorcam"]["cpu_s"])
    }


def test_auto_placement_runs_a_call_refused_for_a_quota_on_the_device_and_says_why(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, wasm: dict[str, Path]
) -> None:
    gw = _gateway_with(make_gateway, tmp_path, "[quotas.device]\ncpu_s_per_day = 0\n")
    with hearth.Client(gw.address, client_id=f"dev-{uuid.uuid4().hex[:8]}") as client:
        first = client.run_wasm(wasm["echo"], b"", ["a"])
        second = client.run_wasm(wasm["echo"], b"", ["b"])
    assert first.where == "local"
    assert "quota_exceeded" in first.reason
    assert "cpu_s_per_day" in first.reason
    # Remembered until the quota resets: not asked again meanwhile.
    assert second.where == "local"
    assert f"gateway {gw.gateway_id} refused" in second.reason


def test_stored_bytes_and_task_quotas_refuse_with_what_was_exceeded(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, wasm: dict[str, Path]
) -> None:
    gw = _gateway_with(
        make_gateway, tmp_path, "[quotas.device]\nstored_bytes = 100000\ntasks = 0\n"
    )
    with RawDevice(gw.listen, gw.gateway_id) as device:
        small = device.upload(b"x" * 1000)
        big = device.upload(os.urandom(200_000))
        task = device.request(
            TaskInstall(name="t", module="0" * 64, triggers=[Trigger(every_s=60.0)])
        )
    assert not isinstance(small, Error)
    assert isinstance(big, Error)
    assert (big.code, big.quota) == (ErrorCode.QUOTA_EXCEEDED, "stored_bytes")
    assert big.resets_at is msgspec.UNSET  # frees up as blobs go, not at a time
    assert isinstance(task, Error)
    assert (task.code, task.quota) == (ErrorCode.QUOTA_EXCEEDED, "tasks")


# --- policy values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ("[quotas.apps.doorcam]\ncpu_s_per_day = -1\n", "cpu_s_per_day"),
        ('[quotas.device]\ncpu_s_per_day = "lots"\n', "Expected `float | null`, got `str`"),
        ("[quotas.device]\nconcurrent_jobs = 1.5\n", "concurrent_jobs"),
        ("[quotas.device]\nstored_gigabytes = 1\n", "unknown field `stored_gigabytes`"),
    ],
)
def test_bad_quota_values_are_a_clear_error_at_load(tmp_path: Path, toml: str, words: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_policy([path])
    assert words in str(caught.value)
    assert "quotas" in str(caught.value)


def test_a_gateway_with_a_bad_quota_does_not_start(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[quotas.device]\ntasks = -3\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth_gateway.cli",
            "run",
            "--no-mdns",
            "--state-dir",
            str(tmp_path / "state"),
            "--policy",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
        check=False,
    )
    assert done.returncode == 2
    assert "$.quotas.device.tasks" in done.stderr


def test_an_applications_limits_fall_back_to_the_defaults_key_by_key() -> None:
    policy = QuotasPolicy(
        app=QuotaLimits(cpu_s_per_day=60.0, concurrent_jobs=2),
        apps={"doorcam": QuotaLimits(cpu_s_per_day=600.0)},
    )
    merged = policy.apps["doorcam"].over(policy.app)
    assert merged == QuotaLimits(cpu_s_per_day=600.0, concurrent_jobs=2)


def test_a_job_over_an_apps_concurrent_jobs_is_refused_and_another_app_is_admitted(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, wasm: dict[str, Path]
) -> None:
    gw = _gateway_with(make_gateway, tmp_path, "[quotas.apps.doorcam]\nconcurrent_jobs = 1\n")
    module = wasm["primes"].read_bytes()
    sha = hashlib.sha256(module).hexdigest()
    with RawDevice(gw.listen, gw.gateway_id) as device:
        device.upload(module)
        # The first runs for about half a second: the second arrives while it does.
        long = WasmJob(job_id="long", module=sha, args=["1000000"], app="doorcam")
        first = device.send(long)
        second = device.request(WasmJob(job_id="next", module=sha, args=["10"], app="doorcam"))
        other = device.request(WasmJob(job_id="other", module=sha, args=["10"], app="thermo"))
        assert isinstance(device.reply(first, timeout_s=60), WasmResult)
    assert isinstance(second, Error)
    assert (second.code, second.quota) == (ErrorCode.QUOTA_EXCEEDED, "concurrent_jobs")
    assert second.resets_at is msgspec.UNSET
    assert isinstance(other, WasmResult)


def test_hearth_usage_shows_this_devices_applications(
    gateway: GatewayProcess,
    wasm: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device = f"dev-{uuid.uuid4().hex[:8]}"
    base = ["--gateway", gateway.address, "--client-id", device, "--app", "doorcam"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))  # no stdin
    assert cli_main(["run", *base, "--where", "edge", str(wasm["echo"]), "u"]) == 0
    capsys.readouterr()
    assert cli_main(["usage", *base, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["client_id"], r["app"], r["jobs"]) for r in rows] == [(device, "doorcam", 1)]
