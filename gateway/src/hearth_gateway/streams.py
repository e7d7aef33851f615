"""Bookkeeping for camera streams and stateful sessions, kept by the daemon (the state itself
lives in one worker; see runners/vision.py).

Streams: frames are dropped, not queued without bound (latest frame wins, workers.py); this
counts what was dropped, per stream and in total. Sessions: which are open, which were closed
(so that a late frame gets ``no_session`` rather than silently opening a fresh session with a
reset pose), and which have gone idle.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from hearth.errors import ErrorCode, JobError

__all__ = ["Sessions", "StreamCounters"]

_REMEMBER_CLOSED = 4096


class StreamCounters:
    def __init__(self, max_streams: int) -> None:
        self._max = max_streams
        self._dropped: OrderedDict[str, int] = OrderedDict()
        self.total_dropped = 0

    def dropped(self, key: str) -> int:
        """Count one dropped frame of stream ``key``; returns the stream's total."""
        count = self._dropped.pop(key, 0) + 1
        self._dropped[key] = count
        while len(self._dropped) > self._max:
            self._dropped.popitem(last=False)
        self.total_dropped += 1
        return count

    def get(self, key: str) -> int:
        return self._dropped.get(key, 0)

    def __len__(self) -> int:
        return len(self._dropped)


class Sessions:
    """Open sessions by scoped key ("{client}/{session}"), with their last-use time."""

    def __init__(
        self,
        *,
        idle_timeout_s: float,
        max_per_client: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle_timeout_s = idle_timeout_s
        self._max_per_client = max_per_client
        self._clock = clock
        self._open: dict[str, float] = {}
        self._frames: dict[str, int] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()  # key -> why

    def use(self, client_id: str, key: str) -> bool:
        """Note a frame for session ``key``; True if it opens the session. Raises JobError
        no_session for a closed session, quota_exceeded past the per-device limit."""
        why = self._closed.get(key)
        if why is not None:
            raise JobError(ErrorCode.NO_SESSION, f"session {key.split('/', 1)[1]!r} {why}")
        is_new = key not in self._open
        if is_new:
            prefix = f"{client_id}/"
            if sum(1 for k in self._open if k.startswith(prefix)) >= self._max_per_client:
                raise JobError(
                    ErrorCode.QUOTA_EXCEEDED,
                    f"at most {self._max_per_client} open sessions per device; close one first",
                )
        self._open[key] = self._clock()
        self._frames[key] = self._frames.get(key, 0) + 1
        return is_new

    def is_open(self, key: str) -> bool:
        return key in self._open

    def close(self, key: str, why: str = "was closed") -> int:
        """Mark ``key`` closed; returns the frames it saw (0 if it was not open)."""
        if key not in self._open:
            return 0
        del self._open[key]
        self._closed[key] = why
        while len(self._closed) > _REMEMBER_CLOSED:
            self._closed.popitem(last=False)
        return self._frames.pop(key, 0)

    def forget(self, key: str) -> None:
        """Undo the opening of ``key`` (its first frame was refused): not remembered as closed."""
        self._open.pop(key, None)
        self._frames.pop(key, None)

    def idle(self) -> list[str]:
        """Sessions unused for longer than the idle timeout (not yet closed)."""
        limit = self._clock() - self._idle_timeout_s
        return [key for key, last in self._open.items() if last < limit]

    def __len__(self) -> int:
        return len(self._open)
