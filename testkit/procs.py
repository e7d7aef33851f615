"""Child processes the harness owns, and what /proc says about processes.

Every child is started in a session of its own: its process group (id = its pid) holds it and
whatever it starts (a gateway's workers and managed broker), so ``stop`` can end all of it, and
a Ctrl-C meant for the test run or benchmark reaches only that, which then stops its children
in order. ``supervised`` children run under ``hearth_gateway._pdeathsig``, so they go too if we
are SIGKILLed. The /proc readers are Linux only and answer "nothing" elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "child_pids",
    "parent_pid",
    "proc_cmdline",
    "proc_memory_bytes",
    "spawn",
    "stop",
    "tail",
    "tree_cpu_s",
]

log = logging.getLogger("testkit")

TAIL_LINES = 20


def spawn(argv: Sequence[str], log_path: Path, *, supervised: bool) -> subprocess.Popen[bytes]:
    """``argv`` with its output appended to ``log_path``, in a new session; ``supervised``: as
    the child of a ``_pdeathsig`` wrapper (the Popen is then the wrapper's)."""
    prefix = [sys.executable, "-m", "hearth_gateway._pdeathsig"] if supervised else []
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,  # its own process group, id = its pid
        )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def stop(proc: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM (a ``_pdeathsig`` wrapper passes it on), wait up to ``grace_s``, then SIGKILL the
    child's process group; with ``grace_s`` 0, SIGKILL at once. Afterwards nothing of that group
    is left. Returns the exit status."""
    if proc.poll() is None:
        if grace_s <= 0:
            _kill_group(proc.pid)
        else:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "pid %d still running %.0f s after SIGTERM; killing it", proc.pid, grace_s
                )
                _kill_group(proc.pid)
    rc = proc.wait()
    # The group is the session started for this child: whatever it left behind (the program
    # under the wrapper, a gateway's workers) is ours to end.
    _kill_group(proc.pid)
    return rc


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _proc_stat(pid: int | str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used) of one process, from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # After the command name: state, ppid, ..., utime and stime at 11 and 12 (in clock ticks).
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid``, or None if it is gone (or there is no /proc)."""
    stat = _proc_stat(pid)
    return stat[0] if stat is not None else None


def child_pids(pid: int) -> list[int]:
    """The live direct children of ``pid``, from /proc (empty without it)."""
    if not Path("/proc/self/stat").exists():
        return []
    return sorted(
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and (st := _proc_stat(p)) and st[0] == pid
    )


def tree_cpu_s(root: int | None = None) -> float:
    """CPU seconds (user + system) used so far by ``root`` (default: this process) and every
    live descendant. NaN without /proc. Descendants that exited are not counted, so take
    differences over spans where the set of processes stays the same."""
    if not Path("/proc/self/stat").exists():
        return math.nan
    root = os.getpid() if root is None else root
    stats = {
        int(pid): st for pid in os.listdir("/proc") if pid.isdigit() and (st := _proc_stat(pid))
    }
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cpu) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def proc_cmdline(pid: int) -> list[str]:
    """A process's argv, from /proc; empty if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def proc_memory_bytes(pid: int, field: str = "VmRSS") -> int | None:
    """A memory figure of one process from /proc/PID/status (``VmRSS``, ``RssAnon``, ...), in
    bytes; None if the process is gone or the field is missing."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024  # always reported in kB
    return None
