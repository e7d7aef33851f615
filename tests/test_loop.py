"""Timer heaps that hold about what is pending, not everything ever cancelled or answered: the
daemon's loop (every job sets its worker's deadline, tens of seconds away, and cancels it when
it ends) and the SDK's call deadlines (every call adds one; most are answered long before).
Left in the heap, those held a minute's worth of jobs for the garbage collector to walk again
and again, and the CPU time per job grew as a run went on. Pure logic, real clocks."""

from __future__ import annotations

import time
from concurrent.futures import Future

from hearth._connection import _Deadlines
from hearth_gateway.loop import Loop


def test_cancelled_timers_do_not_pile_up_and_the_others_still_fire() -> None:
    loop = Loop()
    try:
        fired: list[int] = []
        keep = loop.call_later(0.05, lambda: fired.append(1))
        for _ in range(10_000):
            loop.call_later(60.0, lambda: fired.append(0)).cancel()  # a job's deadline, answered
        assert len(loop._timers) < 600  # not 10,001
        late = loop.call_later(0.1, lambda: fired.append(2))
        loop.run_until(lambda: len(fired) == 2, timeout_s=5)
        assert fired == [1, 2]
        assert keep.cancelled is False
        late.cancel()  # already fired: nothing to count, nothing breaks
        assert loop._cancelled >= 0
    finally:
        loop.close()


def test_answered_calls_leave_the_deadline_heap_and_an_unanswered_one_still_expires() -> None:
    expired: list[bytes] = []
    deadlines = _Deadlines(lambda correlation, _future, _timeout: expired.append(correlation))
    try:
        silent: Future[object] = Future()
        deadlines.add(0.2, b"silent", silent)  # type: ignore[arg-type]
        for i in range(10_000):
            answered: Future[object] = Future()
            deadlines.add(10.0, b"%d" % i, answered)  # type: ignore[arg-type]
            answered.set_result(object())
        assert len(deadlines._heap) < 600  # about what is in flight, not every call
        deadline = time.monotonic() + 5
        while not expired and time.monotonic() < deadline:
            time.sleep(0.02)
        assert expired == [b"silent"]
    finally:
        deadlines.close()
