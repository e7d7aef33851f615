"""``python -m hearth_gateway._pdeathsig PROGRAM ARGS...``: exec PROGRAM so that the kernel
sends it SIGTERM when the process that started it dies (Linux PR_SET_PDEATHSIG survives exec).
Used for the managed Mosquitto, which we cannot change to watch its parent itself."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main() -> None:
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    os.execv(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
