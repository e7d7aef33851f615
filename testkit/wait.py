"""Polling for a condition that another process or thread makes true."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_until"]


def wait_until(
    predicate: Callable[[], object], timeout_s: float = 10.0, step_s: float = 0.02
) -> bool:
    """Whether ``predicate()`` became true within ``timeout_s``; it is asked once more at the
    deadline, so a slow last poll still counts."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return bool(predicate())
