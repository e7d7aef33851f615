"""Length-prefixed frames over the pipes between the daemon and its worker processes:
a 4-byte big-endian length, then that many bytes of MessagePack."""

from __future__ import annotations

import os
import select
import struct

__all__ = ["FrameTimeout", "read_frame", "write_frame"]

_HEADER = struct.Struct(">I")


class FrameTimeout(Exception):
    """No complete frame arrived in time."""


def write_frame(fd: int, payload: bytes) -> None:
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _read_exact(fd: int, n: int, deadline_s: float | None) -> bytes:
    import time

    chunks: list[bytes] = []
    while n:
        if deadline_s is not None:
            left = deadline_s - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise FrameTimeout
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the pipe")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, deadline_s: float | None = None) -> bytes:
    """Read one frame; ``deadline_s`` is a time.monotonic() value. Raises EOFError when the
    other side is gone, FrameTimeout past the deadline."""
    (length,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline_s))
    return _read_exact(fd, length, deadline_s)
