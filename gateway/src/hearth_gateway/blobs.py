"""Content-addressed blobs (WASM modules, ONNX models): files named by their sha256, plus the
uploads in progress. A blob is only ever visible under its hash after its bytes were checked.

Each stored blob has a data label, that of its first complete upload (``BlobChunk.data_class``);
only a public blob may be forwarded to an upstream gateway (placement.py).

Bytes are only taken while the state directory has room above its reserve (storage.py): a
chunk that would not fit, or whose write fails for space, ends its upload with
``storage_full``, and the device uploads again from offset 0 later.

A migratable run's snapshot (its first bytes are the snapshot magic) is sealed as it is
written, with a key of its own (sealed_file.py): modules and models are stored as they came,
a run's memory and data never are."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hearth.errors import ErrorCode
from hearth.protocol import BlobChunk, DataClass
from hearth.runtime.snapshot import SNAPSHOT_MAGIC
from hearth_gateway.crypto import Sealer
from hearth_gateway.policy import LimitsPolicy
from hearth_gateway.sealed_file import SealedWriter
from hearth_gateway.storage import StorageGuard, is_storage_full
from hearth_gateway.store import Store

__all__ = ["BlobStore", "UploadRefused"]

log = logging.getLogger(__name__)


class UploadRefused(Exception):
    """A chunk was refused; ``code`` goes back to the sender."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _storage_full() -> UploadRefused:
    return UploadRefused(ErrorCode.STORAGE_FULL, "the gateway's storage is full; upload later")


@dataclass
class _Upload:
    size: int
    path: Path
    received: int = 0
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    touched: float = field(default_factory=time.monotonic)
    public: bool = True  # until a chunk says private: one private chunk makes the blob private
    sealer: SealedWriter | None = None  # a snapshot: its chunks are sealed as they arrive


class BlobStore:
    def __init__(
        self,
        root: Path,
        store: Store,
        limits: LimitsPolicy,
        *,
        storage: StorageGuard | None = None,
        sealer: Sealer | None = None,
    ) -> None:
        self._root = root
        self._storage = storage
        self._sealer = sealer  # None: snapshots are stored as they came (tests of other parts)
        self._incoming = root / ".incoming"
        self._incoming.mkdir(parents=True, exist_ok=True)
        self._store = store
        self._limits = limits
        self._uploads: dict[tuple[str, str], _Upload] = {}
        # Uploads ended for want of space, and when: their later chunks hear storage_full too.
        self._refused_full: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        for stale in self._incoming.iterdir():  # half uploads from a previous run
            stale.unlink(missing_ok=True)
        # Known hashes in memory: every job asks, and a stat() per job showed in profiles.
        self._known = {p.name for p in root.glob("??/*") if p.is_file()}
        # The public ones, asked for each public job. A blob on disk without a row (or from
        # before labels) is not in here: private, the safe reading.
        self._public = store.public_blobs() & self._known

    def path(self, sha256: str) -> Path:
        return self._root / sha256[:2] / sha256

    def snapshot_key(self, sha256: str) -> bytes:
        """The key a stored snapshot was sealed with (b"": stored unsealed)."""
        if self._sealer is None:
            return b""
        return self._sealer.derive(b"hearth snapshot blob " + sha256.encode())

    def has(self, sha256: str) -> bool:
        return sha256 in self._known

    def data_class(self, sha256: str) -> DataClass | None:
        """A stored blob's label; None when it is not stored (yet)."""
        if sha256 not in self._known:
            return None
        return "public" if sha256 in self._public else "private"

    def receive(self, client_id: str, chunk: BlobChunk) -> bool:
        """Take one chunk. True when the blob is now complete and stored. Raises UploadRefused
        for a chunk that does not continue the upload, too large a blob, or a hash mismatch."""
        if chunk.size > self._limits.max_blob_bytes:
            raise UploadRefused(
                ErrorCode.TOO_LARGE,
                f"blob of {chunk.size} bytes over the limit of {self._limits.max_blob_bytes}",
            )
        if len(chunk.data) > self._limits.max_chunk_bytes:
            raise UploadRefused(
                ErrorCode.TOO_LARGE,
                f"chunk of {len(chunk.data)} bytes over the limit of "
                f"{self._limits.max_chunk_bytes}",
            )
        if chunk.offset + len(chunk.data) > chunk.size:
            raise UploadRefused(ErrorCode.MALFORMED, "chunk runs past the declared size")
        key = (client_id, chunk.sha256)
        with self._lock:
            if self.has(chunk.sha256):
                # Stored already: its label stays the one of its first upload. A public upload
                # of bytes someone stored as private must not make them forwardable.
                self._drop(key)
                return chunk.offset + len(chunk.data) == chunk.size
            upload = self._upload_for(key, chunk)
            if upload is None:
                return False  # a QoS 1 redelivery of a chunk we already have
            upload.public = upload.public and chunk.data_class == "public"
            self._write(
                key, upload, upload.sealer.record(chunk.data) if upload.sealer else chunk.data, "ab"
            )
            upload.hasher.update(chunk.data)
            upload.received += len(chunk.data)
            upload.touched = time.monotonic()
            if upload.received < upload.size:
                return False
            del self._uploads[key]
            label = self._complete(upload, chunk.sha256)
        try:
            self._store.add_blob(chunk.sha256, chunk.size, label)
        except Exception as exc:
            if not is_storage_full(exc):
                raise
            # The bytes are stored; without its row the blob reads as private after a restart,
            # the safe reading, and its count in the status is short by one until then.
            self._full(exc)
        log.info(
            "stored %s blob %s (%d bytes) from %s", label, chunk.sha256[:12], chunk.size, client_id
        )
        return True

    def _upload_for(self, key: tuple[str, str], chunk: BlobChunk) -> _Upload | None:
        """The upload ``chunk`` continues (a new one at offset 0); None for a redelivery."""
        upload = self._uploads.get(key)
        if chunk.offset == 0:
            self._drop(key)  # a fresh start replaces any earlier attempt
            self._check_room(key, chunk.size)
            upload = _Upload(chunk.size, self._incoming / f"{key[0]}-{chunk.sha256}")
            if chunk.data.startswith(SNAPSHOT_MAGIC) and self._sealer is not None:
                upload.sealer = SealedWriter(self.snapshot_key(chunk.sha256))
            self._uploads[key] = upload
            self._write(key, upload, upload.sealer.header() if upload.sealer else b"", "wb")
            return upload
        if (
            upload is not None
            and upload.size == chunk.size
            and chunk.offset + len(chunk.data) <= upload.received
        ):
            return None
        if upload is None and key in self._refused_full:
            # The rest of an upload refused for space: the same reason, not a riddle.
            raise _storage_full()
        if upload is None or upload.received != chunk.offset or upload.size != chunk.size:
            expected = 0 if upload is None else upload.received
            self._drop(key)
            raise UploadRefused(
                ErrorCode.BLOB_INCOMPLETE,
                f"chunk at offset {chunk.offset}, expected {expected}: upload again from 0",
            )
        # Room was there for the whole blob at offset 0; someone else may have taken it since.
        self._check_room(key, len(chunk.data))
        return upload

    def _complete(self, upload: _Upload, sha256: str) -> DataClass:
        """Check the whole upload's hash and move it under its name; returns its label."""
        if upload.hasher.hexdigest() != sha256:
            upload.path.unlink(missing_ok=True)
            raise UploadRefused(
                ErrorCode.HASH_MISMATCH, "uploaded bytes do not match the named sha256"
            )
        final = self.path(sha256)
        try:
            final.parent.mkdir(exist_ok=True)
        except OSError as exc:
            upload.path.unlink(missing_ok=True)
            if not is_storage_full(exc):
                raise
            self._full(exc)
            raise _storage_full() from None
        os.replace(upload.path, final)
        if upload.public:
            self._public.add(sha256)
        self._known.add(sha256)
        return "public" if upload.public else "private"

    def _check_room(self, key: tuple[str, str], nbytes: int) -> None:
        self._refused_full.pop(key, None)
        if self._storage is not None and not self._storage.room_for(nbytes):
            self._drop(key)
            self._refused_full[key] = time.monotonic()
            raise _storage_full()

    def _write(self, key: tuple[str, str], upload: _Upload, data: bytes, mode: str) -> None:
        try:
            with upload.path.open(mode) as f:
                f.write(data)
        except OSError as exc:
            if not is_storage_full(exc):
                raise
            self._full(exc)
            self._drop(key)
            self._refused_full[key] = time.monotonic()
            raise _storage_full() from None

    def _full(self, exc: BaseException) -> None:
        if self._storage is not None:
            self._storage.hit(exc)

    def _drop(self, key: tuple[str, str]) -> None:
        upload = self._uploads.pop(key, None)
        if upload is not None:
            upload.path.unlink(missing_ok=True)

    def expire_uploads(self) -> int:
        """Drop uploads idle for longer than the policy allows; returns how many."""
        deadline = time.monotonic() - self._limits.upload_idle_timeout_s
        with self._lock:
            stale = [key for key, up in self._uploads.items() if up.touched < deadline]
            for key in stale:
                self._drop(key)
            for key, at in list(self._refused_full.items()):
                if at < deadline:
                    del self._refused_full[key]
        return len(stale)

    def discard(self, sha256: str) -> None:
        """Remove a blob whose bytes turned out not to match its hash on load."""
        self._known.discard(sha256)
        self._public.discard(sha256)
        self.path(sha256).unlink(missing_ok=True)
        self._store.remove_blob(sha256)
