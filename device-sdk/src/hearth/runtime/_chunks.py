"""Linear memory as 4 KiB chunks: which are in use, which changed, and writing them back.

Pure numpy over byte arrays (a copy of memory, or a live view of it): snapshots store the chunks
that are not all zero, pre-copy rounds and delta snapshots the chunks that differ from what the
other side already holds. Comparisons go a block at a time so that both operands stay in the
CPU's cache; a whole-memory ``a != b`` would first write a mask as large as an eighth of memory.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import numpy as np

from hearth.runtime.snapshot import CHUNK_BYTES

__all__ = ["CHUNK_BYTES", "apply", "changed", "delta", "gather", "nonzero"]

_WORDS = CHUNK_BYTES // 8
_BLOCK_CHUNKS = 256  # 1 MiB of each operand per comparison
_MAX_THREADS = 4
_MIN_CHUNKS_PER_THREAD = 4096  # 16 MiB: for less, starting a thread costs more than it saves

Bytes = np.ndarray[Any, np.dtype[np.uint8]]
Index = np.ndarray[Any, np.dtype[np.int64]]


def _words(memory: Bytes) -> np.ndarray[Any, np.dtype[np.uint64]]:
    return memory.view(np.uint64).reshape(-1, _WORDS)


def gather(memory: Bytes, index: Index) -> tuple[bytes, bytes]:
    """(chunk index, chunk data) of the chunks ``index`` of ``memory``, ascending."""
    # Straight into the buffer that is sent: one copy of what may be most of memory.
    data = bytearray(len(index) * CHUNK_BYTES)
    out = np.frombuffer(data, dtype=np.uint8).reshape(-1, CHUNK_BYTES)
    np.take(memory.reshape(-1, CHUNK_BYTES), index, axis=0, out=out)
    # Typed as bytes, which is what a decoder gives back: msgspec, zlib and hashlib take the
    # bytearray as they take bytes, and nothing here writes to it once returned.
    return index.astype("<u4").tobytes(), cast(bytes, data)


def nonzero(memory: Bytes) -> tuple[bytes, bytes]:
    """(chunk index, chunk data) of the chunks that are not all zero: a complete memory."""
    words = _words(memory)
    found = [
        np.flatnonzero(words[at : at + _BLOCK_CHUNKS].any(axis=1)) + at
        for at in range(0, len(words), _BLOCK_CHUNKS)
    ]
    return gather(memory, np.concatenate(found) if found else np.empty(0, np.int64))


def changed(memory: Bytes, held: Bytes) -> Index:
    """The chunks of ``memory`` that differ from ``held`` (what the other side holds; where
    ``memory`` is longer, the rest counts as zero, as memory grown there is). A large memory
    is compared in parts on several threads (numpy lets go of the GIL): the final comparison
    of a live migration is most of its downtime, and one core does not use all the bandwidth."""
    words, before = _words(memory), _words(held)
    total = len(words)
    parts = min(_MAX_THREADS, os.cpu_count() or 1, total // _MIN_CHUNKS_PER_THREAD)
    if parts <= 1:
        return _changed(words, before, 0, total)
    step = -(-total // parts // _BLOCK_CHUNKS) * _BLOCK_CHUNKS
    with ThreadPoolExecutor(parts, thread_name_prefix="hearth-chunks") as pool:
        found = list(
            pool.map(
                lambda at: _changed(words, before, at, min(at + step, total)), range(0, total, step)
            )
        )
    return np.concatenate(found)


def _changed(
    words: np.ndarray[Any, np.dtype[np.uint64]],
    before: np.ndarray[Any, np.dtype[np.uint64]],
    start: int,
    stop: int,
) -> Index:
    common = min(stop, len(before))
    found = [
        np.flatnonzero(
            (
                words[at : min(at + _BLOCK_CHUNKS, common)]
                != before[at : min(at + _BLOCK_CHUNKS, common)]
            ).any(1)
        )
        + at
        for at in range(start, common, _BLOCK_CHUNKS)
    ]
    found += [
        np.flatnonzero(words[at : min(at + _BLOCK_CHUNKS, stop)].any(axis=1)) + at
        for at in range(max(start, common), stop, _BLOCK_CHUNKS)
    ]
    return np.concatenate(found) if found else np.empty(0, np.int64)


def delta(memory: Bytes, held: Bytes) -> tuple[bytes, bytes]:
    """(chunk index, chunk data) of the chunks of ``memory`` that differ from ``held``."""
    return gather(memory, changed(memory, held))


def apply(memory: Bytes, chunk_index: bytes, chunk_data: bytes) -> None:
    """Write stored chunks into ``memory`` (a copy or a live view)."""
    index = np.frombuffer(chunk_index, dtype="<u4")
    if len(index):
        data = np.frombuffer(chunk_data, dtype=np.uint8).reshape(-1, CHUNK_BYTES)
        memory.reshape(-1, CHUNK_BYTES)[index] = data
