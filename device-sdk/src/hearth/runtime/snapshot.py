"""The snapshot of a migratable run: what it holds, and its file format (docs/migration.md).

A snapshot file is::

    magic    8 bytes   b"\\x89HSNAP\\r\\n"
    version  2 bytes   big-endian unsigned: SNAPSHOT_FORMAT (1)
    body     rest      zlib stream of one MessagePack map (the Snapshot struct below)

and is named by the sha256 of the whole file, like modules and models. The version sits
outside the compressed body so that a reader refuses a newer format before decompressing.
Memory is sparse: only 4 KiB chunks that are not all zero are stored, so a run that reserved
256 MiB and touched 3 MiB carries 3 MiB (before compression).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Literal

import msgspec

from hearth.errors import ErrorCode, JobError
from hearth.runtime.wasi_host import WasiState

__all__ = [
    "CHUNK_BYTES",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_MAGIC",
    "GlobalValue",
    "Snapshot",
    "decode_snapshot",
    "encode_snapshot",
    "snapshot_sha256",
]

SNAPSHOT_MAGIC = b"\x89HSNAP\r\n"
SNAPSHOT_FORMAT = 1
CHUNK_BYTES = 4096
_HEADER = struct.Struct(">8sH")
# zlib's fastest level: a 64 MiB memory compresses at ~300 MB/s and most of a run's memory is
# zero or repetitive; snapshots are made while a run is paused, so speed wins over ratio.
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


def encode_snapshot(snapshot: Snapshot) -> bytes:
    body = zlib.compress(msgspec.msgpack.encode(snapshot), _ZLIB_LEVEL)
    return _HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_FORMAT) + body


def snapshot_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_snapshot(
    data: bytes, *, sha256: str | None = None, module: str | None = None
) -> Snapshot:
    """Check and decode a snapshot file. Each refusal has its own code: ``hash_mismatch``
    (bytes are not what ``sha256`` names), ``unsupported_version`` (a newer format),
    ``bad_snapshot`` (not a snapshot, truncated, corrupt), ``snapshot_mismatch`` (made for a
    module other than ``module``), ``run_finished`` (the run has already ended)."""
    if sha256 is not None and snapshot_sha256(data) != sha256:
        raise JobError(ErrorCode.HASH_MISMATCH, "snapshot bytes do not match their sha256")
    if len(data) < _HEADER.size:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "truncated snapshot: no header")
    magic, version = _HEADER.unpack_from(data)
    if magic != SNAPSHOT_MAGIC:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "not a Hearth snapshot")
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
    try:
        snapshot = msgspec.msgpack.decode(body, type=Snapshot)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise JobError(ErrorCode.BAD_SNAPSHOT, f"corrupt snapshot: {exc}") from None
    _check_consistent(snapshot)
    if module is not None and snapshot.module != module:
        raise JobError(
            ErrorCode.SNAPSHOT_MISMATCH,
            f"snapshot of module {snapshot.module[:12]}…, not {module[:12]}…",
        )
    if snapshot.finished:
        raise JobError(ErrorCode.RUN_FINISHED, f"run {snapshot.run_id} has already finished")
    return snapshot


def _check_consistent(snapshot: Snapshot) -> None:
    chunks = len(snapshot.chunk_index) // 4
    if len(snapshot.chunk_index) % 4 or len(snapshot.chunk_data) != chunks * CHUNK_BYTES:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "snapshot memory chunks do not add up")
    limit = snapshot.memory_pages * (65536 // CHUNK_BYTES)
    if chunks and max(struct.unpack(f"<{chunks}I", snapshot.chunk_index)) >= limit:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "snapshot memory chunk past the memory's end")
    end = snapshot.unwind_data + snapshot.unwind_bytes
    if snapshot.unwind_data and end > snapshot.memory_pages * 65536:
        raise JobError(ErrorCode.BAD_SNAPSHOT, "snapshot unwind buffer past the memory's end")
