"""``hearth-gateway doctor``: does this box enforce what Hearth promises?

The unit's IP filters (``IPAddressDeny=``/``IPAddressAllow=``, docs/systemd.md) are cgroup BPF
programs, and systemd silently does without them where the kernel or a container cannot attach
them. So the doctor looks, and only looks: it reads /proc, /sys, the unit's properties
(``systemctl show``), the programs attached to the service's cgroup (``bpftool`` if installed,
else the read-only ``BPF_PROG_QUERY`` call), the daemon's status snapshot, the at-rest key's mode
and the broker configuration the daemon wrote. It sends no traffic anywhere and changes nothing.
It also lists the accelerators the box shows (GPUs, NPUs, the devices OpenVINO sees) and says
which onnxruntime build would use those the installed one does not (docs/accelerators.md).

Each check is ok, warn or fail with one line of explanation; the command exits 1 if any check
failed, else 0. Example::

    $ hearth-gateway doctor --state-dir /var/lib/hearth
    ok    kernel IP filters   cgroup v2 at /sys/fs/cgroup; cgroup BPF works (BPF_PROG_QUERY)
    ...
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import shutil
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import msgspec

from hearth_gateway._cgroup_bpf import (
    INET_INGRESS,
    attached_programs,
    cgroup2_mount,
    kernel_config,
    prog_query,
)
from hearth_gateway.accelerators import (
    accelerator_names,
    available_providers,
    box_devices,
    provider_package,
)
from hearth_gateway.config import default_state_dir
from hearth_gateway.policy import LimitsPolicy
from hearth_gateway.status import StatusSnapshot, read_snapshot

__all__ = [
    "UNIT",
    "Check",
    "UnitInfo",
    "check_accelerators",
    "doctor_command",
    "format_checks",
    "run_checks",
]

UNIT = "hearth-gateway.service"
Status = Literal["ok", "warn", "fail"]


class Check(msgspec.Struct, frozen=True):
    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class UnitInfo:
    """What ``systemctl show`` says about the service."""

    name: str
    load_state: str  # loaded | not-found | ...
    active_state: str  # active | inactive | failed | ...
    control_group: str  # relative to the cgroup v2 root, e.g. /system.slice/hearth-gateway.service
    ip_deny: list[str]
    ip_allow: list[str]
    state_directory: str

    @classmethod
    def parse(cls, name: str, text: str) -> UnitInfo:
        props = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
        return cls(
            name=name,
            load_state=props.get("LoadState", ""),
            active_state=props.get("ActiveState", ""),
            control_group=props.get("ControlGroup", ""),
            ip_deny=props.get("IPAddressDeny", "").split(),
            ip_allow=props.get("IPAddressAllow", "").split(),
            state_directory=props.get("StateDirectory", "").split(" ")[0],
        )


def systemd_unit(name: str = UNIT) -> UnitInfo | None:
    """The service's properties; None where systemd is not the init system (sd_booted)."""
    systemctl = shutil.which("systemctl")
    if not Path("/run/systemd/system").is_dir() or systemctl is None:
        return None
    props = [
        "LoadState",
        "ActiveState",
        "ControlGroup",
        "IPAddressDeny",
        "IPAddressAllow",
        "StateDirectory",
    ]
    try:
        out = subprocess.run(
            [systemctl, "show", name, *(f"--property={p}" for p in props)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return UnitInfo.parse(name, out)


# -- the kernel -----------------------------------------------------------------------------------


def check_kernel(cgroup2: Path | None) -> Check:
    name = "kernel IP filters"
    if cgroup2 is None:
        return Check(
            name,
            "fail",
            "no cgroup v2 hierarchy mounted: systemd cannot attach "
            "IPAddressDeny= filters, which then do nothing",
        )
    where = f"cgroup v2 at {cgroup2}"
    config = kernel_config("CONFIG_CGROUP_BPF")
    if config == "n":
        return Check(name, "fail", f"{where}, but the kernel is built without CONFIG_CGROUP_BPF")
    try:
        prog_query(cgroup2, INET_INGRESS)
    except OSError as exc:
        if exc.errno == errno.EINVAL and config is None:
            return Check(name, "fail", f"{where}, but the kernel refuses cgroup BPF queries")
        if config == "y":
            return Check(name, "ok", f"{where}; kernel built with CONFIG_CGROUP_BPF")
        return Check(
            name,
            "warn",
            f"{where}; cannot tell whether cgroup BPF works ({exc.strerror}; run as root)",
        )
    return Check(name, "ok", f"{where}; cgroup BPF works (BPF_PROG_QUERY answered)")


# -- the service ----------------------------------------------------------------------------------

# Link-scoped multicast (mDNS among it): routers do not forward it, so it stays on the LAN.
_LINK_MULTICAST_V4 = ipaddress.IPv4Network("224.0.0.0/24")
_LINK_MULTICAST_V6 = ipaddress.IPv6Network("ff02::/16")


def _public(entries: list[str]) -> list[str]:
    """Entries that reach beyond the LAN."""
    public = []
    for entry in entries:
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            continue  # a keyword systemd did not expand
        if isinstance(net, ipaddress.IPv4Network):
            link_scoped = net.subnet_of(_LINK_MULTICAST_V4)
        else:
            link_scoped = net.subnet_of(_LINK_MULTICAST_V6)
        if net.is_global and not link_scoped:
            public.append(entry)
    return public


def _cloud(snapshot: StatusSnapshot | None) -> bool:
    return snapshot is not None and (snapshot.tier == "cloud" or bool(snapshot.upstream))


def _pid_cgroup(pid: int) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        return None
    return None


def check_unit_filters(  # noqa: PLR0911 - one return per verdict reads best
    unit: UnitInfo | None, snapshot: StatusSnapshot | None
) -> Check:
    name = "service IP filters"
    if unit is None:
        return Check(
            name,
            "warn",
            "not running under systemd: no IPAddressDeny= filter, the "
            "kernel does not limit the gateway's traffic to the LAN",
        )
    if unit.load_state != "loaded":
        return Check(
            name,
            "warn",
            f"systemd runs, but {unit.name} is {unit.load_state or 'unknown'}"
            " (install systemd/hearth-gateway.service)",
        )
    if snapshot is not None and snapshot.state == "online" and unit.control_group:
        cgroup = _pid_cgroup(snapshot.pid)
        if cgroup is not None and not cgroup.startswith(unit.control_group):
            return Check(
                name,
                "warn",
                f"the running gateway (pid {snapshot.pid}) is not "
                f"{unit.name}: the unit's filters do not apply to it",
            )
    cloud = _cloud(snapshot)
    if not unit.ip_deny:
        if cloud:
            return Check(name, "ok", "no IP filter: lifted for the cloud tier (cloud-tier.conf)")
        return Check(
            name,
            "fail",
            "IPAddressDeny= is empty and no cloud tier is configured: "
            "install the shipped unit, or drop the drop-in that resets it",
        )
    if not {"0.0.0.0/0", "::/0"} <= set(unit.ip_deny):
        return Check(
            name,
            "warn",
            f"IPAddressDeny={' '.join(unit.ip_deny)} leaves other "
            "addresses open (the shipped unit denies any)",
        )
    public = _public(unit.ip_allow)
    if public and not cloud:
        return Check(
            name,
            "warn",
            f"denies any, but allows public {' '.join(public)} with no cloud tier configured",
        )
    extra = f", plus {' '.join(public)} (cloud tier)" if public else ""
    return Check(
        name,
        "ok",
        f"IPAddressDeny=any; IPAddressAllow= {len(unit.ip_allow)} LAN "
        f"ranges (loopback, link-local, mDNS, private){extra}",
    )


def check_attached(unit: UnitInfo | None, cgroup2: Path | None) -> Check:  # noqa: PLR0911
    name = "filters attached"
    if unit is None:
        return Check(name, "warn", "not running under systemd: no service cgroup to inspect")
    if unit.load_state != "loaded" or unit.active_state != "active" or not unit.control_group:
        return Check(name, "warn", f"{unit.name} is not running: nothing attached to inspect")
    if cgroup2 is None:
        return Check(name, "fail", "no cgroup v2 hierarchy: nothing can be attached")
    cgroup = cgroup2 / unit.control_group.lstrip("/")
    try:
        ingress, egress, how = attached_programs(cgroup)
    except OSError as exc:
        return Check(
            name,
            "warn",
            f"unknown: bpftool is not installed and BPF_PROG_QUERY on "
            f"{cgroup} failed ({exc.strerror}; run as root)",
        )
    if ingress and egress:
        return Check(
            name,
            "ok",
            f"{ingress} ingress and {egress} egress programs in force on "
            f"{cgroup} ({how}): the kernel enforces the filter",
        )
    if unit.ip_deny:
        return Check(
            name,
            "fail",
            f"IPAddressDeny= is set but no IP program is attached to "
            f"{cgroup} ({how}): this kernel or container ignores it",
        )
    return Check(name, "ok", "no IP filter configured, none attached")


# -- the gateway's own state ----------------------------------------------------------------------


def check_workers(snapshot: StatusSnapshot | None, state_dir: Path) -> Check:
    name = "worker network"
    if snapshot is None:
        return Check(name, "warn", f"no status in {state_dir}: has a gateway run with it?")
    if snapshot.state != "online":
        return Check(
            name,
            "warn",
            f"the gateway is {snapshot.state} (workers in its last run: {snapshot.worker_network})",
        )
    if snapshot.worker_network == "isolated":
        return Check(name, "ok", "workers run in a network namespace of their own (no network)")
    if snapshot.worker_network == "unknown":
        return Check(name, "warn", "workers have not reported yet")
    return Check(name, "fail", f"workers share the host's network: {snapshot.worker_network}")


def check_key(state_dir: Path) -> Check:
    name = "at-rest key"
    path = state_dir / "keys" / "at-rest.key"
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Check(
            name,
            "warn",
            f"no {path}: not started with this state directory yet, "
            "or the key is a systemd credential",
        )
    except OSError as exc:
        return Check(name, "warn", f"cannot read {path}: {exc.strerror} (run as root)")
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return Check(name, "fail", f"{path} is not a regular file")
    if mode & 0o077:
        return Check(
            name,
            "fail",
            f"{path} has mode {mode:04o}: others can read the key that "
            "seals stored payloads (chmod 0600)",
        )
    return Check(name, "ok", f"{path} has mode {mode:04o}")


@dataclass(frozen=True)
class Listener:
    host: str
    port: str
    tls: bool = False
    client_certs: bool = False

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False  # a name, or empty: every interface


def broker_listeners(conf: str) -> list[Listener]:
    """The listeners of a mosquitto.conf, with whether each does TLS and wants certificates."""
    found: list[Listener] = []
    for line in conf.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "listener":
            port, _, host = value.strip().partition(" ")
            found.append(Listener(host=host.strip(), port=port))
        elif found and key == "certfile":
            found[-1] = replace(found[-1], tls=True)
        elif found and key == "require_certificate" and value.strip() == "true":
            found[-1] = replace(found[-1], client_certs=True)
    return found


def _describe(listener: Listener) -> str:
    if listener.loopback:
        kind = "loopback"
    elif listener.client_certs:
        kind = "TLS, client certificates"
    else:
        kind = "TLS (pairing)"
    return f"{listener.host}:{listener.port} {kind}"


def check_broker(state_dir: Path, snapshot: StatusSnapshot | None) -> Check:
    name = "broker listeners"
    if snapshot is not None and not snapshot.managed_broker:
        host = snapshot.broker.rpartition(":")[0]
        if Listener(host, "").loopback:
            return Check(name, "ok", f"external broker on loopback ({snapshot.broker})")
        return Check(
            name,
            "warn",
            f"external broker at {snapshot.broker}: plain MQTT across "
            "the network; its listeners are its own configuration",
        )
    path = state_dir / "mosquitto" / "mosquitto.conf"
    try:
        listeners = broker_listeners(path.read_text())
    except OSError as exc:
        return Check(name, "warn", f"cannot read {path}: {exc.strerror}")
    if not listeners:
        return Check(name, "warn", f"no listener in {path}")
    plain = [f"{x.host or '*'}:{x.port}" for x in listeners if not (x.loopback or x.tls)]
    if plain:
        return Check(
            name,
            "fail",
            f"plain MQTT beyond loopback on {', '.join(plain)}: "
            "LAN devices must use the TLS listener (lan_listen)",
        )
    return Check(name, "ok", "; ".join(_describe(x) for x in listeners))


def check_storage(state_dir: Path, snapshot: StatusSnapshot | None) -> Check:
    """Free space where the state lives, against the reserve the daemon keeps (its snapshot
    says which; the policy's default otherwise). Below it the daemon refuses work with
    storage_full: a fail here, since devices then run everything themselves."""
    name = "storage"
    try:
        st = os.statvfs(state_dir)
    except OSError as exc:
        return Check(name, "warn", f"cannot look at {state_dir}: {exc.strerror}")
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if snapshot is not None and snapshot.storage_reserve_bytes:
        reserve = snapshot.storage_reserve_bytes
    else:
        limits = LimitsPolicy()
        reserve = max(
            limits.storage_reserve_bytes, int(total * limits.storage_reserve_percent / 100)
        )
    detail = f"{free / 1e6:.1f} MB free of {total / 1e6:.1f} MB, {reserve / 1e6:.1f} MB reserve"
    refused = snapshot.storage_refused if snapshot is not None else 0
    if refused:
        detail += f"; {refused} requests refused for space since the daemon started"
    if free < reserve:
        return Check(
            name, "fail", f"full: uploads, jobs and task installs get storage_full ({detail})"
        )
    if free < 2 * reserve:
        return Check(name, "warn", f"nearly full ({detail})")
    return Check(name, "ok", detail)


# -- accelerators ---------------------------------------------------------------------------------

_GUIDE = "see docs/accelerators.md"


def check_accelerators(
    devices: Mapping[str, list[str]],
    providers: list[str],
    package: str,
    env: Mapping[str, str],
) -> Check:
    """Which accelerators this box has (``accelerators.box_devices()``), and whether the
    installed onnxruntime build (``package``, offering ``providers``) uses them."""
    name = "accelerators"
    if package == "none":
        return Check(name, "warn", "onnxruntime is not installed: ONNX jobs and vision.plate fail")
    found = [
        *(f"NVIDIA GPU {d}" for d in devices.get("nvidia", [])),
        *(f"Intel iGPU {d}" for d in devices.get("intel_gpu", [])),
        *(f"NPU {d}" for d in devices.get("npu", [])),
    ]
    seen = devices.get("openvino", [])
    installed = f"{package} runs {', '.join(accelerator_names(providers))}"
    if seen:
        installed += f" (OpenVINO devices: {', '.join(seen)})"
    advice: list[str] = []
    unused = False
    if devices.get("nvidia") and "CUDAExecutionProvider" not in providers:
        unused = True
        advice.append(
            "NVIDIA GPU found: install onnxruntime-gpu in a virtualenv of its own "
            f"(scripts/accel_venv.sh), {_GUIDE}"
        )
    intel = {"GPU": devices.get("intel_gpu", []), "NPU": devices.get("npu", [])}
    if any(intel.values()) and "OpenVINOExecutionProvider" not in providers:
        unused = True
        kinds = " and ".join("Intel iGPU" if k == "GPU" else "NPU" for k, v in intel.items() if v)
        advice.append(f"{kinds} found: install the OpenVINO build: `make openvino` / {_GUIDE}")
    elif "OpenVINOExecutionProvider" in providers:
        wanted = env.get("HEARTH_OPENVINO_DEVICE", "").strip() or "CPU"
        for kind, nodes in intel.items():
            if not nodes:
                continue
            if not any(d.startswith(kind) for d in seen):
                unused = True
                advice.append(
                    f"OpenVINO does not see the {kind} at {nodes[0]}: its driver's user-space "
                    f"runtime is missing or the service may not open the node, {_GUIDE}"
                )
            elif kind not in wanted:
                unused = True
                advice.append(
                    f"OpenVINO uses the {wanted}: set HEARTH_OPENVINO_DEVICE={kind} "
                    f"in the service's environment for the {kind}"
                )
    if not found:
        advice.append(
            "no GPU or NPU found: models run on the CPU"
            + (
                ""
                if "OpenVINOExecutionProvider" in providers
                else "; on an Intel CPU the OpenVINO build can run them faster "
                f"(`make openvino`, {_GUIDE})"
            )
        )
    return Check(name, "warn" if unused else "ok", "; ".join([*found, installed, *advice]))


# -- the command ----------------------------------------------------------------------------------


def run_checks(state_dir: Path, unit: UnitInfo | None, cgroup2: Path | None) -> list[Check]:
    snapshot = read_snapshot(state_dir)
    return [
        check_kernel(cgroup2),
        check_unit_filters(unit, snapshot),
        check_attached(unit, cgroup2),
        check_workers(snapshot, state_dir),
        check_key(state_dir),
        check_broker(state_dir, snapshot),
        check_storage(state_dir, snapshot),
        check_accelerators(box_devices(), available_providers(), provider_package(), os.environ),
    ]


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{c.status:<5} {c.name:<{width}}  {c.detail}" for c in checks]
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append(f"{failed} failed, {warned} warnings, {len(checks) - failed - warned} ok")
    return "\n".join(lines)


def doctor_command(args: argparse.Namespace) -> int:
    """``hearth-gateway doctor [--state-dir DIR] [--unit NAME] [--json]``."""
    unit = systemd_unit(args.unit)
    if args.state_dir:
        state_dir = Path(args.state_dir)
    elif unit is not None and unit.state_directory and not os.environ.get("STATE_DIRECTORY"):
        # Run by hand on a box with the service: look at the service's state.
        state_dir = Path("/var/lib") / unit.state_directory
    else:
        state_dir = default_state_dir()
    checks = run_checks(state_dir, unit, cgroup2_mount())
    ok = not any(c.status == "fail" for c in checks)
    if args.json:
        report = {"ok": ok, "state_dir": str(state_dir), "checks": checks}
        print(msgspec.json.encode(report).decode())
    else:
        print(format_checks(checks))
    return 0 if ok else 1
