"""The snapshot of a migratable run: what it holds, and its file format (docs/migration.md).

A snapshot file is::

    magic    8 bytes   b"\\x89HSNAP\\r\\n"
    version  2 bytes   big-endian unsigned: SNAPSHOT_FORMAT (1)
    body     rest      zlib stream of one MessagePack map (the Snapshot struct below)

and is named by the sha256 of the whole file, like modules and models. The version sits
outside the compressed body so that a reader refuses a newer format before decompressing.
Memory is sparse: only 4 KiB chunks that are not all zero are stored, so a run that reserved
256 MiB and touched 3 MiB carries 3 MiB (before compression).

Live migration (pre-copy) sends memory ahead in rounds while the run goes on; a round is a
file of the same shape with its own magic (``b"\\x89HMEMR\\r\\n"``) and a :class:`MemoryRound`
body. The snapshot that ends it is a *delta*: ``precopy_rounds`` > 0 says its chunks are the
ones that differ from the memory those rounds built, not the ones that are not zero.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import zlib
from typing import Literal, TypeVar

import msgspec

from hearth.errors import ErrorCode, JobError
from hearth.runtime.wasi_host import WasiState

__all__ = [
    "CHUNK_BYTES",
    "ROUND_MAGIC",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_MAGIC",
    "GlobalValue",
    "MemoryRound",
    "Snapshot",
    "decode_round",
    "decode_snapshot",
    "encode_round",
    "encode_snapshot",
    "snapshot_sha256",
]

SNAPSHOT_MAGIC = b"\x89HSNAP\r\n"
ROUND_MAGIC = b"\x89HMEMR\r\n"
SNAPSHOT_FORMAT = 1
CHUNK_BYTES = 4096
_HEADER = struct.Struct(">8sH")
_PAGE = 65536
# zlib's fastest level by default: most of a run's memory is zero or repetitive, and a
# snapshot is made while the run waits. Level 0 (stored blocks: no compression, the same
# stream format) is for loopback and fast LANs, where compressing costs more than sending.
_ZLIB_LEVEL = 1
# Refuse to inflate a body past this (a zip bomb would otherwise take the host's memory): the
# memory limit of a run plus room for its WASI state and output.
_MAX_BODY_BYTES = 4 * 1024 * 1024 * 1024


class GlobalValue(msgspec.Struct, array_like=True, frozen=True):
    index: int
    type: Literal["i32", "i64", "f32", "f64"]
    value: int | float


class Snapshot(msgspec.Struct, kw_only=True):
    """A paused run, complete: resume it on any Hearth runtime with the same module."""

    module: str  # sha256 of the (instrumented) module the run executes
    run_id: str
    seq: int = 0  # how many snapshots of this run came before (checkpoints count)
    data_class: Literal["private", "public"] = "private"
    memory_pages: int = 0  # 64 KiB WebAssembly pages
    chunk_index: bytes = b""  # little-endian u32 per stored chunk, ascending
    chunk_data: bytes = b""  # CHUNK_BYTES per stored chunk, in chunk_index order
    globals: list[GlobalValue] = []
    unwind_data: int = 0  # address of the Asyncify buffer in linear memory; 0: not started
    unwind_bytes: int = 0
    wasi: WasiState
    fuel_used: int = 0
    # The places the run has been, oldest first ("local", a gateway id): reported in results.
    hops: list[str] = []
    finished: bool = False
    exit_code: int | None = None
    # 0: memory is complete (chunks not stored are zero). n > 0: a delta that ends a live
    # migration; chunks not stored are as pre-copy rounds 0..n-1 of this run left them.
    precopy_rounds: int = 0


class MemoryRound(msgspec.Struct, kw_only=True):
    """One pre-copy round: chunks of a running run's memory, sent ahead of its pause."""

    module: str
    run_id: str
    number: int  # 0, 1, 2 ...: rounds are applied in order, none skipped
    memory_pages: int  # the memory's size when the round was read (it only grows)
    # Round 0: the chunks that are not zero. Round k: the chunks that differ from what rounds
    # 0..k-1 sent (including chunks that became zero). Same encoding as a snapshot's.
    chunk_index: bytes = b""
    chunk_data: bytes = b""


_Body = TypeVar("_Body", Snapshot, MemoryRound)


def _encode(magic: bytes, body: msgspec.Struct, level: int) -> bytes:
    return _HEADER.pack(magic, SNAPSHOT_FORMAT) + zlib.compress(msgspec.msgpack.encode(body), level)


def encode_snapshot(snapshot: Snapshot, *, level: int = _ZLIB_LEVEL) -> bytes:
    """The snapshot file; ``level`` is zlib's (0: stored, not compressed)."""
    return _encode(SNAPSHOT_MAGIC, snapshot, level)


def encode_round(memory_round: MemoryRound, *, level: int = _ZLIB_LEVEL) -> bytes:
    return _encode(ROUND_MAGIC, memory_round, level)


def snapshot_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decode(data: bytes, magic: bytes, kind: type[_Body]) -> _Body:
    if len(data) < _HEADER.size:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "truncated snapshot: no header")
    found, version = _HEADER.unpack_from(data)
    if found != magic:
        raise JobError(ErrorCode.BAD_SNAPSHOT, f"not a Hearth {kind.__name__}")
    if version != SNAPSHOT_FORMAT:
        raise JobError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"snapshot format {version}; this runtime reads format {SNAPSHOT_FORMAT}",
        )
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(data[_HEADER.size :], _MAX_BODY_BYTES)
    except zlib.error:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "corrupt snapshot body") from None
    if not inflater.eof:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "truncated snapshot body")
    if inflater.unused_data:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "bytes after the snapshot body")
    try:
        decoded = msgspec.msgpack.decode(body, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise JobError(ErrorCode.BAD_SNAPSHOT, f"corrupt snapshot: {exc}") from None
    _check_chunks(decoded.chunk_index, decoded.chunk_data, decoded.memory_pages)
    return decoded


def decode_snapshot(
    data: bytes, *, sha256: str | None = None, module: str | None = None
) -> Snapshot:
    """Check and decode a snapshot file. Each refusal has its own code: ``hash_mismatch``
    (bytes are not what ``sha256`` names), ``unsupported_version`` (a newer format),
    ``bad_snapshot`` (not a snapshot, truncated, corrupt), ``snapshot_mismatch`` (made for a
    module other than ``module``), ``run_finished`` (the run has already ended)."""
    if sha256 is not None and snapshot_sha256(data) != sha256:
        raise JobError(ErrorCode.HASH_MISMATCH, "snapshot bytes do not match their sha256")
    snapshot = _decode(data, SNAPSHOT_MAGIC, Snapshot)
    if module is not None and snapshot.module != module:
        raise JobError(
            ErrorCode.SNAPSHOT_MISMATCH,
            f"snapshot of module {snapshot.module[:12]}…, not {module[:12]}…",
        )
    if snapshot.finished:  # its memory and stack no longer matter: nothing to resume
        raise JobError(ErrorCode.RUN_FINISHED, f"run {snapshot.run_id} has already finished")
    end = snapshot.unwind_data + snapshot.unwind_bytes
    if snapshot.unwind_data and end > snapshot.memory_pages * _PAGE:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "snapshot unwind buffer past the memory's end")
    if snapshot.precopy_rounds < 0:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "negative precopy_rounds")
    return snapshot


def decode_round(data: bytes) -> MemoryRound:
    """Check and decode a pre-copy round (refusals as :func:`decode_snapshot`'s)."""
    return _decode(data, ROUND_MAGIC, MemoryRound)


def _check_chunks(chunk_index: bytes, chunk_data: bytes, memory_pages: int) -> None:
    chunks = len(chunk_index) // 4
    if len(chunk_index) % 4 or len(chunk_data) != chunks * CHUNK_BYTES:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "snapshot memory chunks do not add up")
    if memory_pages < 0 or memory_pages > 65536:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "snapshot memory size out of range")
    if not chunks:
        return
    index = struct.unpack(f"<{chunks}I", chunk_index)
    if max(index) >= memory_pages * (_PAGE // CHUNK_BYTES):
        raise JobError(ErrorCode.BAD_SNAPSHOT, "snapshot memory chunk past the memory's end")
    if any(a >= b for a, b in itertools.pairwise(index)):
        raise JobError(ErrorCode.BAD_SNAPSHOT, "snapshot memory chunks out of order")
