"""Length-prefixed frames over the pipes between the daemon and its worker processes:
a 4-byte big-endian length, then that many bytes of MessagePack."""

from __future__ import annotations

import os
import struct

__all__ = ["FrameReader", "read_frame", "write_frame"]

_HEADER = struct.Struct(">I")


def write_frame(fd: int, payload: bytes) -> None:
    """Header and payload in one system call where the pipe takes them (no joined copy)."""
    header = _HEADER.pack(len(payload))
    written = os.writev(fd, (header, payload))
    if written == len(header) + len(payload):
        return
    rest = memoryview(header + payload)[written:]  # a full pipe: rare, and copied once
    while rest:
        rest = rest[os.write(fd, rest) :]


def read_frame(fd: int) -> bytearray:
    """Blocking read of one frame (the worker's side), straight into its own buffer. Raises
    EOFError when the pipe closes."""
    (length,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    return _read_exact(fd, length)


def _read_exact(fd: int, n: int) -> bytearray:
    buffer = bytearray(n)
    view = memoryview(buffer)
    done = 0
    while done < n:
        got = os.readv(fd, (view[done:],))
        if not got:
            raise EOFError("peer closed the pipe")
        done += got
    return buffer


class FrameReader:
    """Non-blocking side (the daemon's): feed it whatever a read returned, take whole frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        if not self._buffer and len(data) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(data)
            if len(data) == _HEADER.size + length:  # the usual read: one whole frame
                return [data[_HEADER.size :]]
        self._buffer += data
        frames: list[bytes] = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            with memoryview(self._buffer) as view:  # one copy, not a slice and a copy
                frames.append(bytes(view[_HEADER.size : end]))
            del self._buffer[:end]
        return frames
