"""Content-addressed blobs (WASM modules, ONNX models): files named by their sha256, plus the
uploads in progress. A blob is only ever visible under its hash after its bytes were checked.

Each stored blob has a data label, that of its first complete upload (``BlobChunk.data_class``);
only a public blob may be forwarded to an upstream gateway (placement.py).

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
from hearth_gateway.store import Store

__all__ = ["BlobStore", "UploadRefused"]

log = logging.getLogger(__name__)


class UploadRefused(Exception):
    """A chunk was refused; ``code`` goes back to the sender."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
        self, root: Path, store: Store, limits: LimitsPolicy, sealer: Sealer | None = None
    ) -> None:
        self._root = root
        self._sealer = sealer  # None: snapshots are stored as they came (tests of other parts)
        self._incoming = root / ".incoming"
        self._incoming.mkdir(parents=True, exist_ok=True)
        self._store = store
        self._limits = limits
        self._uploads: dict[tuple[str, str], _Upload] = {}
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
            upload = self._uploads.get(key)
            if chunk.offset == 0:
                self._drop(key)  # a fresh start replaces any earlier attempt
                upload = _Upload(chunk.size, self._incoming / f"{client_id}-{chunk.sha256}")
                if chunk.data.startswith(SNAPSHOT_MAGIC) and self._sealer is not None:
                    upload.sealer = SealedWriter(self.snapshot_key(chunk.sha256))
                upload.path.write_bytes(upload.sealer.header() if upload.sealer else b"")
                self._uploads[key] = upload
            elif (
                upload is not None
                and upload.size == chunk.size
                and chunk.offset + len(chunk.data) <= upload.received
            ):
                return False  # a QoS 1 redelivery of a chunk we already have
            elif upload is None or upload.received != chunk.offset or upload.size != chunk.size:
                expected = 0 if upload is None else upload.received
                self._drop(key)
                raise UploadRefused(
                    ErrorCode.BLOB_INCOMPLETE,
                    f"chunk at offset {chunk.offset}, expected {expected}: upload again from 0",
                )
            assert upload is not None
            upload.public = upload.public and chunk.data_class == "public"
            with upload.path.open("ab") as f:
                f.write(upload.sealer.record(chunk.data) if upload.sealer else chunk.data)
            upload.hasher.update(chunk.data)
            upload.received += len(chunk.data)
            upload.touched = time.monotonic()
            if upload.received < upload.size:
                return False
            del self._uploads[key]
            if upload.hasher.hexdigest() != chunk.sha256:
                upload.path.unlink(missing_ok=True)
                raise UploadRefused(
                    ErrorCode.HASH_MISMATCH, "uploaded bytes do not match the named sha256"
                )
            final = self.path(chunk.sha256)
            final.parent.mkdir(exist_ok=True)
            os.replace(upload.path, final)
            label: DataClass = "public" if upload.public else "private"
            if upload.public:
                self._public.add(chunk.sha256)
            self._known.add(chunk.sha256)
        self._store.add_blob(chunk.sha256, chunk.size, label)
        log.info("stored %s blob %s (%d bytes) from %s", label, chunk.sha256[:12], chunk.size,
                 client_id)  # fmt: skip
        return True

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
        return len(stale)

    def discard(self, sha256: str) -> None:
        """Remove a blob whose bytes turned out not to match its hash on load."""
        self._known.discard(sha256)
        self._public.discard(sha256)
        self.path(sha256).unlink(missing_ok=True)
        self._store.remove_blob(sha256)
