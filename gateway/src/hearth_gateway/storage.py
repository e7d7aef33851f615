"""Free space in the state directory, and what the gateway does when there is none.

Blobs, the journal, task state and snapshots all live in one directory. When its file system
is full (or down to the reserve the policy keeps free: ``limits.storage_reserve_percent`` of it,
at least ``limits.storage_reserve_bytes``), the gateway refuses anything that would store bytes
with the retryable ``storage_full`` error instead of failing half-way: a device hears at once,
and ``auto`` placement runs the work on the device. The reserve leaves room for what the
gateway must still write to finish what it accepted (answers, status), and for SQLite's WAL.

The check is a ``statvfs``, cached for a second (it sits on every job and every chunk); an
``ENOSPC`` or SQLite's "database or disk is full" from a write marks the directory full at once,
whatever the last look said. Nothing here retries: the next check after the cache expires sees
the space come back, and the gateway says so once in its log, as it said once that it was full.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["StorageGuard", "StorageState", "is_storage_full"]

log = logging.getLogger(__name__)

_CACHE_S = 1.0  # a statvfs result is trusted this long


def is_storage_full(exc: BaseException) -> bool:
    """An error that says the disk (or the user's quota) is full, from the OS or SQLite."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc)
    return False


@dataclass(frozen=True, slots=True)
class StorageState:
    """One look at the state directory's file system, for status, doctor and mDNS."""

    full: bool
    free_bytes: int  # available to the gateway (statvfs f_bavail)
    total_bytes: int
    reserve_bytes: int  # kept free: refused below it
    refused: int  # requests answered storage_full since start

    def describe(self) -> str:
        return (
            f"{_size(self.free_bytes)} free of {_size(self.total_bytes)}, "
            f"{_size(self.reserve_bytes)} kept in reserve"
        )


class StorageGuard:
    """Whether the state directory may take ``n`` more bytes. Loop thread only (the lock-free
    counters and the cached look are not shared with other threads)."""

    def __init__(
        self,
        path: Path,
        *,
        reserve_percent: float,
        reserve_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._percent = reserve_percent
        self._min_bytes = reserve_bytes
        self._clock = clock
        self._looked_at = -_CACHE_S
        self._free = 0
        self._total = 0
        self._full = False
        self._hit = False  # a write failed for space since the last look
        self.refused = 0

    def _look(self) -> None:
        now = self._clock()
        if now - self._looked_at < _CACHE_S:
            return
        self._looked_at = now
        if not self._stat():
            self._set_full(True)
            return
        self._hit = False
        self._set_full(self._free < self.reserve)

    def _stat(self) -> bool:
        try:
            st = os.statvfs(self._path)
        except OSError as exc:  # the directory went away: nothing we can store either
            log.warning("cannot look at free space in %s: %s", self._path, exc.strerror)
            return False
        self._free = st.f_bavail * st.f_frsize
        self._total = st.f_blocks * st.f_frsize
        return True

    @property
    def reserve(self) -> int:
        return max(self._min_bytes, int(self._total * self._percent / 100))

    def _set_full(self, full: bool) -> None:
        if full == self._full:
            return
        self._full = full
        if full:
            log.warning(
                "storage full in %s (%s): uploads, jobs and tasks are refused with "
                "storage_full until space returns",
                self._path,
                self.state().describe(),
            )
        else:
            log.warning(
                "storage space is back in %s (%s): accepting work again",
                self._path,
                self.state().describe(),
            )

    def room_for(self, nbytes: int = 0) -> bool:
        """True when ``nbytes`` more fit above the reserve. A False answer is counted: the
        caller refuses the request with storage_full."""
        self._look()
        ok = not self._hit and not self._full and self._free - nbytes >= self.reserve
        if not ok:
            self.refused += 1
        return ok

    def hit(self, exc: BaseException) -> None:
        """A write failed with ``exc`` (is_storage_full): full until the next look says not."""
        self._hit = True
        self._looked_at = self._clock()  # the next look is due in _CACHE_S, not now
        self._stat()  # for the figures in the log line
        self._set_full(True)
        log.debug("write failed for space: %s", exc)

    def refresh(self) -> StorageState:
        """Look again (from housekeeping: recovery is noticed without a request) and report."""
        self._look()
        return self.state()

    def state(self) -> StorageState:
        return StorageState(
            full=self._full,
            free_bytes=self._free,
            total_bytes=self._total,
            reserve_bytes=self.reserve,
            refused=self.refused,
        )

    @property
    def full(self) -> bool:
        self._look()
        return self._full


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
