"""The daemon's concurrency model: one thread, one selector.

The MQTT socket, the worker processes' pipes, timers and a self-pipe for signals all feed one
loop in the main thread. Decoding, admission, journaling and publishing happen there, in order,
without locks or thread hand-offs; the heavy work runs in worker processes in parallel. (A
design with a network thread plus one thread per worker paid two GIL hand-offs per job.)

Callbacks registered with ``after`` run at the end of each turn, once the ready descriptors and
due timers are handled: the journal commits there what the turn wrote (one transaction for
however many jobs arrived or finished together), then answers and acknowledgements go out.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Loop", "Timer"]

log = logging.getLogger(__name__)

Callback = Callable[[], None]


# Cancelled timers are left in the heap (removing one is O(n)) until they come up, or until
# they are more than half of it: then it is rebuilt without them. Every job sets its worker's
# deadline (tens of seconds away) and cancels it when it ends: without this, the heap held a
# minute's worth of jobs' timers, and the garbage collector walked them all again and again.
_COMPACT_OVER = 256


@dataclass(order=True)
class Timer:
    when: float
    seq: int
    callback: Callback = field(compare=False)
    cancelled: bool = field(default=False, compare=False)
    loop: Loop | None = field(default=None, compare=False, repr=False)

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        if self.loop is not None:
            self.loop._timer_cancelled()


class Loop:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timers: list[Timer] = []
        self._cancelled = 0  # cancelled timers still in the heap
        self._after: list[Callback] = []
        self._seq = itertools.count()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.add_reader(self._wake_r, self._drain_wakeups)
        self._closed = False
        # Consulted before an exception from a callback is logged as unexpected: True when it
        # was an expected condition, handled (the daemon's: a full disk, said once).
        self.on_error: Callable[[BaseException], bool] | None = None

    # -- file descriptors --------------------------------------------------------------------

    def _update(self, fd: int) -> None:
        events = (selectors.EVENT_READ if fd in self._readers else 0) | (
            selectors.EVENT_WRITE if fd in self._writers else 0
        )
        try:
            key = self._selector.get_key(fd)
        except KeyError:
            key = None
        if key is None and events:
            self._selector.register(fd, events)
        elif key is not None and not events:
            self._selector.unregister(fd)
        elif key is not None and key.events != events:
            self._selector.modify(fd, events)

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        self._readers.pop(fd, None)
        self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        self._writers.pop(fd, None)
        self._update(fd)

    def after(self, callback: Callback) -> None:
        """Run ``callback`` at the end of every turn of the loop, after those added before."""
        self._after.append(callback)

    # -- time ---------------------------------------------------------------------------------

    def call_later(self, delay_s: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + delay_s, next(self._seq), callback, loop=self)
        heapq.heappush(self._timers, timer)
        return timer

    def _timer_cancelled(self) -> None:
        self._cancelled += 1
        if self._cancelled > _COMPACT_OVER and self._cancelled * 2 > len(self._timers):
            self._timers = [t for t in self._timers if not t.cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def every(self, interval_s: float, callback: Callback) -> None:
        """Run ``callback`` every ``interval_s`` for as long as the loop runs."""

        def tick() -> None:
            try:
                callback()
            finally:
                self.call_later(interval_s, tick)

        self.call_later(interval_s, tick)

    # -- signals ------------------------------------------------------------------------------

    def wake_on_signals(self) -> None:
        """Make a signal interrupt select() at once (its handler runs before we look again)."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- running ------------------------------------------------------------------------------

    def run_once(self, max_wait_s: float = 1.0) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
            self._cancelled -= 1
        wait = max_wait_s
        if self._timers:
            wait = max(0.0, min(wait, self._timers[0].when - now))
        for key, events in self._selector.select(wait):
            fd = int(key.fd)
            if events & selectors.EVENT_READ and fd in self._readers:
                self._run(self._readers[fd])
            if events & selectors.EVENT_WRITE and fd in self._writers:
                self._run(self._writers[fd])
        now = time.monotonic()
        while self._timers and self._timers[0].when <= now:
            timer = heapq.heappop(self._timers)
            if timer.cancelled:
                self._cancelled -= 1
            else:
                timer.loop = None  # fired: a late cancel() has nothing to count
                self._run(timer.callback)
        for callback in self._after:
            self._run(callback)

    def _run(self, callback: Callback) -> None:
        try:
            callback()
        except Exception as exc:  # one failing callback must not stop the daemon
            if self.on_error is None or not self.on_error(exc):
                log.exception("unexpected error in %r", callback)

    def run_until(self, done: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Run until ``done()`` is true (returns True) or ``timeout_s`` passes (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done():
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.run_once(min(1.0, left))
            else:
                self.run_once()
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError):  # not the main thread: nothing was set
            signal.set_wakeup_fd(-1)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
