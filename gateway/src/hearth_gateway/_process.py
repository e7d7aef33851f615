"""A process held so that the signals meant for it reach it and no other: through a pidfd
(Linux 5.3+), which goes on naming that one process after it exits, whoever gets its pid number
next. Where pidfds are refused (an older kernel, a seccomp filter answering EPERM), by pid,
re-reading its command line before each signal.

``from_pid_file`` is how the daemon finds the broker of its own state directory, the one it
started or one that a killed predecessor left behind: the pid in the file counts only if that
process's arguments are exactly the expected ones (``-c`` and this state directory's
``mosquitto.conf``; its watcher's, which end the same way, do not count). Nothing is ever looked
up by name.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ProcessHandle"]


def _cmdline(pid: int) -> list[str]:
    """``pid``'s argv; empty for a zombie, a kernel thread or a pid that is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


class ProcessHandle:
    def __init__(self, pid: int, fd: int | None, args: Sequence[str] | None) -> None:
        self.pid = pid
        self._fd = fd
        self._args = list(args) if args is not None else None
        self._closed = False

    @classmethod
    def open(cls, pid: int, args: Sequence[str] | None = None) -> ProcessHandle | None:
        """``pid`` if it is running and, with ``args``, runs with exactly those arguments
        (whatever its executable); None otherwise."""
        try:
            fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        except OSError:  # ENOSYS, or EPERM from a seccomp filter
            fd = None
        handle = cls(pid, fd, args)
        # Checked after the pidfd is open: if the pid was reused in between, the pidfd names
        # the process that is gone, and no signal can reach the newcomer.
        if not handle._matches() or not handle.alive():
            handle.close()
            return None
        return handle

    @classmethod
    def from_pid_file(cls, path: Path, args: Sequence[str]) -> ProcessHandle | None:
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        return cls.open(pid, args) if pid > 1 else None

    def _matches(self) -> bool:
        if self._args is None:
            return True
        return _cmdline(self.pid)[1:] == self._args

    def alive(self) -> bool:
        """Running: not exited (a zombie has exited). False once closed."""
        if self._closed:
            return False
        if self._fd is not None:
            return not self._exited_within(0.0)
        return bool(_cmdline(self.pid)) and self._matches()

    def _exited_within(self, timeout_s: float) -> bool:
        assert self._fd is not None
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)  # readable once the process has exited
        return bool(poller.poll(int(timeout_s * 1000)))

    def signal(self, signum: int) -> bool:
        """Whether the signal was sent (False: it had exited, or this handle is closed)."""
        if self._closed:
            return False
        try:
            if self._fd is not None:
                signal.pidfd_send_signal(self._fd, signum)
            elif self.alive():
                os.kill(self.pid, signum)
            else:
                return False
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout_s: float) -> bool:
        """Whether it exited within ``timeout_s``."""
        if self._fd is not None:
            return self._exited_within(timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def end(self, timeout_s: float = 5.0) -> bool:
        """SIGTERM, then SIGKILL if it is still running ``timeout_s`` later; whether it is
        gone."""
        if not self.signal(signal.SIGTERM) or self.wait(timeout_s):
            return True
        self.signal(signal.SIGKILL)
        return self.wait(timeout_s)

    def close(self) -> None:
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
