"""Flow control of what a run's hop sends its device before its answer (docs/migration.md §8.4).

Pre-copy rounds, checkpoints and the pieces of large snapshots leave a worker faster than a
device can take them in: without a bound they pile up in the daemon, the broker (which drops
what is past its per-client queue) and the device, and a run that stops for its last delta
waits behind them. A device that says so (``window_bytes`` in ``run_start``/``run_resume``)
acknowledges each of the hop's interim messages once handled (``run_control`` ``received``: how
many so far; a round counts once applied): the worker sends a message only while the bytes not
yet acknowledged, with it, fit in the window (one larger than the window goes alone), and a
pre-copy measures its next round only when the previous one is applied.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from hearth.errors import ErrorCode, JobError

__all__ = ["SendWindow"]

log = logging.getLogger(__name__)


class SendWindow:
    """Interim messages sent and not yet acknowledged, by number (1, 2, ...) and size.
    ``window`` 0: the device does not acknowledge, nothing waits. Thread-safe: messages go
    out from the run's thread (checkpoints) and the pre-copy thread, acknowledgements come in
    on the signal listener's."""

    def __init__(self, window: int, timeout_s: float = 30.0) -> None:
        self.window = window
        self._timeout_s = timeout_s
        self._cond = threading.Condition()
        self._pending: deque[tuple[int, int]] = deque()  # (number, bytes) not acknowledged
        self._in_flight = 0
        self._count = 0  # interim messages sent on this hop
        self._closed = False

    @property
    def on(self) -> bool:
        return self.window > 0

    @property
    def closed(self) -> bool:
        """The hop is over (its run ended or stopped)."""
        return self._closed

    def wait_room(self, size: int) -> None:
        """Wait until ``size`` more bytes fit in the window (or nothing is in flight)."""
        self._wait(lambda: self._in_flight + size <= self.window or not self._pending)

    def drain(self) -> None:
        """Wait until the device has acknowledged everything sent."""
        self._wait(lambda: not self._pending)

    def sent(self, size: int) -> None:
        """One more interim message of ``size`` payload bytes has gone out."""
        with self._cond:
            self._count += 1
            if self.on:
                self._pending.append((self._count, size))
                self._in_flight += size

    def ack(self, received: int) -> None:
        """The device has handled the first ``received`` interim messages."""
        with self._cond:
            while self._pending and self._pending[0][0] <= received:
                self._in_flight -= self._pending.popleft()[1]
            self._cond.notify_all()

    def close(self) -> None:
        """The hop is over: nothing waits any more (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool]) -> None:
        if not self.on:
            return
        with self._cond:
            if self._cond.wait_for(lambda: self._closed or ready(), self._timeout_s):
                return
            # A device that stopped acknowledging (gone, or stuck): flow control is off for
            # the rest of the hop, and the caller gives up what it was waiting for.
            log.warning(
                "device acknowledged nothing for %.0f s (%d bytes in flight): flow control off",
                self._timeout_s,
                self._in_flight,
            )
            self.window = 0
            self._pending.clear()
            self._in_flight = 0
            self._cond.notify_all()
        raise JobError(ErrorCode.TIMEOUT, "the device stopped acknowledging")
