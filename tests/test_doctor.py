"""``hearth-gateway doctor``: run as a command here (where systemd is usually not PID 1), against a
real gateway's state, and check by check on prepared inputs (a key file with the wrong mode, a
plain-MQTT LAN listener, the unit properties systemctl would print)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hearth_gateway._cgroup_bpf import INET_INGRESS, cgroup2_mount, prog_query
from hearth_gateway.accelerators import box_devices
from hearth_gateway.doctor import (
    UnitInfo,
    check_accelerators,
    check_attached,
    check_broker,
    check_unit_filters,
)
from hearth_gateway.status import StatusSnapshot, write_snapshot
from testkit.gateway import GatewayProcess

CHECKS = [
    "kernel IP filters",
    "service IP filters",
    "filters attached",
    "worker network",
    "at-rest key",
    "broker listeners",
    "storage",
    "accelerators",
]

# What `systemctl show` prints for the shipped unit (systemd expands the keywords).
LAN_ONLY = (
    "LoadState=loaded\n"
    "ActiveState=active\n"
    "ControlGroup=/system.slice/hearth-gateway.service\n"
    "IPAddressDeny=0.0.0.0/0 ::/0\n"
    "IPAddressAllow=127.0.0.0/8 ::1/128 169.254.0.0/16 fe80::/64 fe80::/10 224.0.0.251/32 "
    "ff02::fb/128 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7\n"
    "StateDirectory=hearth\n"
)


def _doctor(state_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth_gateway.cli",
            "doctor",
            "--state-dir",
            str(state_dir),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _report(state_dir: Path) -> tuple[int, dict[str, Any]]:
    done = _doctor(state_dir, "--json")
    report = json.loads(done.stdout)
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert report["ok"] == (done.returncode == 0)
    assert report["ok"] == all(c["status"] != "fail" for c in report["checks"])
    return done.returncode, {c["name"]: c for c in report["checks"]}


def _snapshot(**changes: Any) -> StatusSnapshot:
    fields: dict[str, Any] = {
        "gateway_id": "gw",
        "state": "online",
        "pid": os.getpid(),
        "version": "0",
        "broker": "127.0.0.1:1883",
        "managed_broker": True,
        "broker_pid": None,
        "mdns": False,
        "runners": ["wasm"],
        "providers": [],
        "workers": 1,
        "worker_pids": [],
        "worker_restarts": 0,
        "worker_network": "isolated",
        "busy_workers": 0,
        "queue_depth": 0,
        "jobs_accepted": 0,
        "jobs_completed": 0,
        "jobs_refused": 0,
        "jobs_duplicate": 0,
        "blobs": 0,
        "blob_bytes": 0,
        "started_at": time.time(),
        "updated_at": time.time(),
    }
    fields.update(changes)
    return StatusSnapshot(**fields)


# -- the command ---------------------------------------------------------------------------------


def test_doctor_here_gives_a_verdict_per_check(tmp_path: Path) -> None:
    rc, checks = _report(tmp_path)
    for check in checks.values():
        assert check["status"] in {"ok", "warn", "fail"}
        assert check["detail"]
        assert "\n" not in check["detail"]
    # An empty state directory: nothing has run, which is a warning, not a failure.
    for name in ("worker network", "at-rest key", "broker listeners"):
        assert checks[name]["status"] == "warn", checks[name]
    if not Path("/run/systemd/system").is_dir():
        assert "not running under systemd" in checks["service IP filters"]["detail"]
        assert checks["filters attached"]["status"] == "warn"
    text = _doctor(tmp_path)
    assert text.returncode == rc
    lines = text.stdout.splitlines()
    assert len(lines) == len(CHECKS) + 1
    assert all(any(name in line for line in lines) for name in CHECKS)
    print("\n" + text.stdout)


def test_doctor_names_this_boxs_accelerators_or_gives_the_cpu_only_advice(tmp_path: Path) -> None:
    """Here, with the plain onnxruntime build; the OpenVINO build's doctor is in test_accel."""
    _, checks = _report(tmp_path)
    check = checks["accelerators"]
    assert check["detail"].startswith("onnxruntime ") or "GPU" in check["detail"]
    assert "runs cpu" in check["detail"]
    devices = box_devices()
    if not (devices["intel_gpu"] or devices["npu"] or devices["nvidia"]):  # this VM
        assert check["status"] == "ok"
        assert "no GPU or NPU found: models run on the CPU" in check["detail"]
        assert "`make openvino`" in check["detail"]
    else:  # a lent GPU machine: the hardware is named, with the package that would use it
        assert check["status"] == "warn"
        assert "found: install" in check["detail"]


def test_a_key_file_others_can_read_fails(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "at-rest.key"
    key.parent.mkdir(mode=0o700)
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    rc, checks = _report(tmp_path)
    assert checks["at-rest key"]["status"] == "fail"
    assert "0644" in checks["at-rest key"]["detail"]
    assert rc == 1
    key.chmod(0o600)
    _, checks = _report(tmp_path)
    assert checks["at-rest key"]["status"] == "ok"


def test_a_running_gateway_passes_its_own_checks(make_gateway) -> None:
    gateway: GatewayProcess = make_gateway(managed=True)
    _, checks = _report(gateway.state_dir)
    assert checks["at-rest key"]["status"] == "ok"  # the daemon creates it 0600
    assert checks["broker listeners"]["status"] == "ok"
    assert "loopback" in checks["broker listeners"]["detail"]
    expected = "ok" if gateway.snapshot().worker_network == "isolated" else "fail"
    assert checks["worker network"]["status"] == expected, checks["worker network"]


# -- one check at a time -------------------------------------------------------------------------


def test_a_plain_listener_on_the_lan_fails(tmp_path: Path) -> None:
    conf = tmp_path / "mosquitto" / "mosquitto.conf"
    conf.parent.mkdir()
    tls = "cafile /x/ca.pem\ncertfile /x/server.pem\nkeyfile /x/server.key\n"
    conf.write_text(
        "listener 1883 127.0.0.1\nallow_anonymous true\n"
        f"listener 8883 0.0.0.0\n{tls}require_certificate true\n"
        f"listener 8884 0.0.0.0\n{tls}require_certificate false\n"
    )
    good = check_broker(tmp_path, None)
    assert good.status == "ok", good
    assert good.detail == (
        "127.0.0.1:1883 loopback; 0.0.0.0:8883 TLS, client certificates; 0.0.0.0:8884 TLS (pairing)"
    )
    conf.write_text(conf.read_text() + "listener 1884 0.0.0.0\nallow_anonymous true\n")
    bad = check_broker(tmp_path, None)
    assert bad.status == "fail"
    assert "0.0.0.0:1884" in bad.detail


def test_an_external_broker_is_judged_by_its_address(tmp_path: Path) -> None:
    local = check_broker(tmp_path, _snapshot(managed_broker=False, broker="127.0.0.1:1883"))
    assert local.status == "ok"
    lan = check_broker(tmp_path, _snapshot(managed_broker=False, broker="192.168.1.5:1883"))
    assert lan.status == "warn"


def test_accelerator_advice_names_the_package_that_would_use_the_hardware() -> None:
    none = {"intel_gpu": [], "npu": [], "nvidia": [], "openvino": []}
    plain = ["CPUExecutionProvider"]
    igpu = {**none, "intel_gpu": ["/dev/dri/renderD128"]}
    check = check_accelerators(igpu, plain, "onnxruntime 1.32.0", {})
    assert check.status == "warn"
    assert "Intel iGPU /dev/dri/renderD128" in check.detail
    assert "Intel iGPU found: install the OpenVINO build: `make openvino`" in check.detail

    npu = {**none, "npu": ["/dev/accel/accel0"]}
    assert "NPU found: install the OpenVINO build" in check_accelerators(npu, plain, "x", {}).detail

    nvidia = {**none, "nvidia": ["NVIDIA GeForce RTX 3060"]}
    check = check_accelerators(nvidia, plain, "onnxruntime 1.32.0", {})
    assert check.status == "warn"
    assert "NVIDIA GPU found: install onnxruntime-gpu" in check.detail
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    check = check_accelerators(nvidia, cuda, "onnxruntime-gpu 1.24.1", {})
    assert check.status == "ok"
    assert "runs cuda, cpu" in check.detail

    openvino = ["OpenVINOExecutionProvider", "CPUExecutionProvider"]
    sees_gpu = {**igpu, "openvino": ["CPU", "GPU"]}
    package = "onnxruntime-openvino 1.24.1"
    idle = check_accelerators(sees_gpu, openvino, package, {})
    assert idle.status == "warn"  # OpenVINO runs on the CPU while the iGPU waits
    assert "(OpenVINO devices: CPU, GPU)" in idle.detail
    assert "HEARTH_OPENVINO_DEVICE=GPU" in idle.detail
    used = check_accelerators(sees_gpu, openvino, package, {"HEARTH_OPENVINO_DEVICE": "GPU"})
    assert used.status == "ok", used
    blind = check_accelerators({**igpu, "openvino": ["CPU"]}, openvino, package, {})
    assert blind.status == "warn"
    assert "OpenVINO does not see the GPU at /dev/dri/renderD128" in blind.detail

    cpu_only = check_accelerators(none, plain, "onnxruntime 1.32.0", {})
    assert cpu_only.status == "ok"
    assert "`make openvino`" in cpu_only.detail
    assert check_accelerators(none, [], "none", {}).status == "warn"


def test_unit_filters_verdicts() -> None:
    unit = UnitInfo.parse("hearth-gateway.service", LAN_ONLY)
    assert unit.state_directory == "hearth"
    assert check_unit_filters(unit, None).status == "ok"
    assert check_unit_filters(None, None).status == "warn"

    lifted = UnitInfo.parse("hearth-gateway.service", LAN_ONLY.replace("0.0.0.0/0 ::/0", ""))
    assert check_unit_filters(lifted, None).status == "fail"  # home gateway, no filter
    # Stopped: an online one would be this test process, which is not in the unit's cgroup.
    cloud = _snapshot(state="stopped", upstream="mqtts://cloud.example:8883")
    assert check_unit_filters(lifted, cloud).status == "ok"  # the cloud-tier drop-in

    # systemctl prints each property once: the upstream joins the allow list.
    public = UnitInfo.parse("x.service", LAN_ONLY.replace("fc00::/7", "fc00::/7 9.9.9.9/32"))
    assert check_unit_filters(public, None).status == "warn"
    assert check_unit_filters(public, cloud).status == "ok"
    missing = UnitInfo.parse("hearth-gateway.service", "LoadState=not-found\n")
    assert check_unit_filters(missing, None).status == "warn"


def test_a_filter_nothing_enforces_fails() -> None:
    """The unit says deny, but the cgroup has no IP program: what a container or an old kernel
    does silently. Here the cgroup v2 root stands in for the service's cgroup."""
    cgroup2 = cgroup2_mount()
    if cgroup2 is None:
        pytest.skip("no cgroup v2 hierarchy mounted here")
    try:
        attached = prog_query(cgroup2, INET_INGRESS)
    except OSError as exc:
        pytest.skip(f"BPF_PROG_QUERY not possible here: {exc.strerror}")
    if attached:
        pytest.skip("this host filters IP traffic at the cgroup root")
    unit = UnitInfo.parse(
        "hearth-gateway.service", LAN_ONLY.replace("/system.slice/hearth-gateway.service", "/")
    )
    check = check_attached(unit, cgroup2)
    assert check.status == "fail", check
    assert "ignores it" in check.detail
    stopped = UnitInfo.parse("x.service", LAN_ONLY.replace("active", "inactive"))
    assert check_attached(stopped, cgroup2).status == "warn"


def test_status_snapshot_fixture_is_a_valid_snapshot(tmp_path: Path) -> None:
    # Keeps _snapshot honest as StatusSnapshot grows: doctor reads what the daemon writes.
    write_snapshot(tmp_path, _snapshot(worker_network="shared: no libc"))
    _, checks = _report(tmp_path)
    assert checks["worker network"]["status"] == "fail"
    assert "shared: no libc" in checks["worker network"]["detail"]
