"""Length-prefixed frames over the pipes between the daemon and its worker processes:
a 4-byte big-endian length, then that many bytes of MessagePack."""

from __future__ import annotations

import os
import struct

__all__ = ["FrameReader", "read_frame", "write_frame"]

_HEADER = struct.Struct(">I")


def write_frame(fd: int, payload: bytes) -> None:
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        written = os.write(fd, data)
        data = data[written:]


def read_frame(fd: int) -> bytes:
    """Blocking read of one frame (the worker's side). Raises EOFError when the pipe closes."""
    (length,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    return _read_exact(fd, length)


def _read_exact(fd: int, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the pipe")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class FrameReader:
    """Non-blocking side (the daemon's): feed it whatever a read returned, take whole frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[_HEADER.size : end]))
            del self._buffer[:end]
        return frames
