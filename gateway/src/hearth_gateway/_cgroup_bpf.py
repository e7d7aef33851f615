"""Whether this kernel filters a cgroup's IP traffic, found by looking only: the cgroup v2 mount,
the kernel's build options, and the programs attached to a cgroup (``bpftool`` where installed,
else the read-only ``BPF_PROG_QUERY`` call). Nothing here loads, attaches or sends anything.
Used by ``hearth-gateway doctor``."""

from __future__ import annotations

import ctypes
import errno
import gzip
import json
import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path

__all__ = [
    "INET_EGRESS",
    "INET_INGRESS",
    "attached_programs",
    "cgroup2_mount",
    "kernel_config",
    "prog_query",
]


def cgroup2_mount(mounts: str | None = None) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup (unified), or
    /sys/fs/cgroup/unified beside the v1 controllers (hybrid). systemd attaches IP filters there."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def kernel_config(option: str) -> str | None:
    """``y``/``m``/``n`` for a kernel build option, from /proc/config.gz or /boot; None when
    neither is readable."""
    release = platform.release()
    for path, opener in (
        (Path("/proc/config.gz"), gzip.open),
        (Path(f"/boot/config-{release}"), open),
    ):
        try:
            with opener(path, "rt") as f:
                text: str = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(f"{option}="):
                return line.split("=", 1)[1].strip()
            if line == f"# {option} is not set":
                return "n"
        return "n"
    return None


# bpf(2) numbers per architecture; BPF_PROG_QUERY only reads which programs are attached.
_BPF_SYSCALL = {
    "x86_64": 321,
    "aarch64": 280,
    "riscv64": 280,
    "loongarch64": 280,
    "armv7l": 386,
    "armv6l": 386,
    "i686": 357,
    "i386": 357,
}
_BPF_PROG_QUERY = 16
_BPF_F_QUERY_EFFECTIVE = 1  # programs inherited from parent cgroups count: they filter too
_ATTR_BYTES = 64
INET_INGRESS, INET_EGRESS = 0, 1  # BPF_CGROUP_INET_INGRESS / _EGRESS


def prog_query(cgroup: Path, attach_type: int) -> int:
    """How many programs of ``attach_type`` are in force on ``cgroup``. Raises OSError: EPERM
    without privileges (or under a seccomp filter), EINVAL where the kernel has no cgroup BPF,
    ENOSYS without bpf()."""
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"bpf() number unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (ctypes.c_uint32 * 64)()
        # union bpf_attr, query: target_fd, attach_type, query_flags, attach_flags (u32 each),
        # prog_ids (u64 pointer), prog_cnt (u32, in: room, out: count); the rest zero.
        raw = struct.pack(
            "=IIIIQI", fd, attach_type, _BPF_F_QUERY_EFFECTIVE, 0, ctypes.addressof(ids), len(ids)
        )
        attr = ctypes.create_string_buffer(raw.ljust(_ATTR_BYTES, b"\0"), _ATTR_BYTES)
        result = libc.syscall(
            ctypes.c_long(number), ctypes.c_int(_BPF_PROG_QUERY), attr, ctypes.c_uint(_ATTR_BYTES)
        )
        code = ctypes.get_errno()
        if result != 0 and code != errno.ENOSPC:  # ENOSPC: more than 64, count still set
            raise OSError(code, os.strerror(code))
        return int(struct.unpack_from("=I", attr.raw, 24)[0])
    finally:
        os.close(fd)


def attached_programs(cgroup: Path) -> tuple[int, int, str]:
    """(ingress, egress, how) for the IP programs in force on ``cgroup``: bpftool where it is
    installed, else BPF_PROG_QUERY. Raises OSError when neither can tell."""
    bpftool = shutil.which("bpftool")
    if bpftool is not None:
        try:
            done = subprocess.run(
                [bpftool, "-j", "cgroup", "show", str(cgroup), "effective"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            entries = json.loads(done.stdout or "[]") if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError):
            entries = None
        if isinstance(entries, list):
            # Older bpftool says "ingress", newer "cgroup_inet_ingress".
            kinds = [str(e.get("attach_type", "")) for e in entries if isinstance(e, dict)]
            ingress = sum(k in ("ingress", "cgroup_inet_ingress") for k in kinds)
            egress = sum(k in ("egress", "cgroup_inet_egress") for k in kinds)
            return ingress, egress, "bpftool"
    ingress = prog_query(cgroup, INET_INGRESS)
    return ingress, prog_query(cgroup, INET_EGRESS), "BPF_PROG_QUERY"
