"""The daemon's log lines: for the journal under systemd, plain lines otherwise.

systemd sets ``JOURNAL_STREAM`` (``device:inode``) when a service's stderr is connected to the
journal. Then each line starts with its syslog priority, ``<3>`` to ``<7>`` (sd-daemon(3)), so
that ``journalctl -p warning`` finds the warnings, and carries no time of its own: the journal
stamps every line. A traceback's lines each carry the record's priority (the journal reads one
entry per line). Elsewhere (a terminal, a file, a test): ``time LEVEL logger: message``.

The variable is trusted only when stderr still is that stream: a child of the service whose
stderr was redirected inherits the variable but not the journal.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

__all__ = ["JournalFormatter", "configure_logging", "journal_stream"]

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# logging's levels to syslog priorities (sd-daemon.h: SD_ERR 3, SD_WARNING 4, SD_INFO 6...).
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG = 7


def priority(levelno: int) -> int:
    return next((p for level, p in _PRIORITIES if levelno >= level), _DEBUG)


def journal_stream(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (stderr by default) is the journal stream systemd connected."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):  # no file descriptor (replaced by a test, closed)
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``, the prefix on every line of a multi-line record."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def configure_logging(verbose: bool = False, stream: TextIO | None = None) -> bool:
    """Set up the root logger for the daemon; True when it writes for the journal."""
    target = stream or sys.stderr
    handler = logging.StreamHandler(target)
    journal = journal_stream(target)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return journal
