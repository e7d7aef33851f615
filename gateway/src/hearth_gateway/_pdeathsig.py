"""``python -m hearth_gateway._pdeathsig PROGRAM ARGS...``: run PROGRAM as a child that does not
outlive the gateway daemon, even when the daemon is SIGKILLed.

Linux's PR_SET_PDEATHSIG would do it alone, but it is cleared when a program changes its
credentials, which Mosquitto does when started as root (it drops to the `mosquitto` user). So
this small supervisor holds the parent-death signal itself and passes termination on.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

_PR_SET_PDEATHSIG = 1


def main() -> int:
    parent = os.getppid()
    # Not Linux: no parent-death signal, but the daemon's own close() still stops the child.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the daemon died before prctl took effect
        return 1
    child = subprocess.Popen(sys.argv[1:])

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)  # the gateway's "reload ACLs and CRL" (broker.py)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
