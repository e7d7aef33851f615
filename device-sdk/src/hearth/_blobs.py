"""Modules and models as content-addressed blobs: read and hashed once per file, uploaded in
chunks when a gateway asks for one (``need_blob``), once however many calls asked."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from hearth._connection import Connection
from hearth._futures import running
from hearth._results import Stats
from hearth.errors import ErrorCode, JobError
from hearth.protocol import BlobChunk, BlobStored, DataClass, Error, Reply

__all__ = ["Blob", "BlobCache", "UploadProgress", "Uploads"]

# Called as chunks of an upload reach the broker: (sha256, bytes so far, size). From the MQTT
# network thread: it must be quick and must not call back into the client.
UploadProgress = Callable[[str, int, int], None]

_MAX_CHUNK = 1 << 20  # bytes: whatever larger chunk a gateway would accept
_UPLOAD_RATE = 5e6  # bytes/s: the slowest upload we wait for before giving up


@dataclass
class Blob:
    data: bytes
    sha256: str


class BlobCache:
    """Blobs by file name, read and hashed once (bytes are hashed on every call)."""

    def __init__(self) -> None:
        self._by_path: dict[str, Blob] = {}

    def get(self, source: bytes | str | Path) -> Blob:
        if not isinstance(source, str | Path):
            data = bytes(source)
            return Blob(data, hashlib.sha256(data).hexdigest())
        cached = self._by_path.get(str(source))
        if cached is None:
            data = Path(source).read_bytes()
            cached = self._by_path[str(source)] = Blob(data, hashlib.sha256(data).hexdigest())
        return cached


@dataclass
class _Upload:
    done: Future[None] = field(default_factory=running)
    finished_at: float = -1.0  # monotonic, once it succeeded


class Uploads:
    """Uploads to the gateway, one at a time per blob: calls that need a blob being uploaded
    wait for that upload rather than send it again."""

    def __init__(self, stats: Stats, timeout_s: float) -> None:
        self._stats = stats
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._uploads: dict[tuple[str | None, str], _Upload] = {}
        self.progress: UploadProgress | None = None  # None: no per-chunk work at all
        # The application uploads are for (the client's ``app``): quotas count stored bytes
        # per application. UNSET: the device's own.
        self.app: str | msgspec.UnsetType = msgspec.UNSET

    def ensure(
        self,
        conn: Connection,
        blob: Blob,
        max_chunk: int,
        data_class: DataClass,
        asked_after: float,
        *,
        to: str | None = None,
    ) -> Future[None]:
        """The blob on the gateway, for a request sent at ``asked_after`` (monotonic) that got
        ``need_blob``: an upload that is under way or finished since then serves it too.
        ``to``: the pool member that asked (its ``need_blob`` named it), where it goes."""
        key = (to or conn.gateway_id, blob.sha256)
        with self._lock:
            upload = self._uploads.get(key)
            if upload is not None and (not upload.done.done() or upload.finished_at >= asked_after):
                return upload.done
            upload = self._uploads[key] = _Upload()
        # The blob gets the label of the work that needs it; the gateway keeps the first label
        # it saw, so a blob once private stays private there.
        self._send(conn, blob, max_chunk, data_class, upload, to=to)
        return upload.done

    def _send(
        self,
        conn: Connection,
        blob: Blob,
        max_chunk: int,
        data_class: DataClass,
        upload: _Upload,
        *,
        to: str | None,
    ) -> None:
        correlation = f"blob-{blob.sha256}".encode()
        if to is not None:  # a pool's member: a chunk sent to the pool would reach any member
            correlation += f"@{to}".encode()  # uploads to several members at once
            conn.route(correlation, to)
        size = len(blob.data)
        stored = conn.expect(correlation, self._timeout_s + size / _UPLOAD_RATE)
        chunk = max(1, min(max_chunk, _MAX_CHUNK))
        progress = self.progress
        acked = _Acked(blob.sha256, size, progress) if progress is not None else None
        try:
            for offset in range(0, max(size, 1), chunk):
                data = blob.data[offset : offset + chunk]
                part = BlobChunk(
                    sha256=blob.sha256,
                    size=size,
                    offset=offset,
                    data=data,
                    data_class=data_class,
                    app=self.app,
                )
                if acked is None:
                    conn.publish(part, correlation)
                else:
                    conn.publish(part, correlation, acked.chunk(len(data)))
                self._stats.blob_bytes_sent += len(data)
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits on the upload
            conn.forget(correlation, stored)
            upload.done.set_exception(exc)
            return
        self._stats.blob_uploads += 1
        stored.add_done_callback(lambda f: self._acknowledged(f, upload))

    @staticmethod
    def _acknowledged(stored: Future[Reply], upload: _Upload) -> None:
        try:
            reply = stored.result()
        except TimeoutError:
            upload.done.set_exception(TimeoutError("blob upload not acknowledged"))
            return
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits on the upload
            upload.done.set_exception(exc)
            return
        if isinstance(reply, Error):
            upload.done.set_exception(JobError(reply.code, reply.message, where="edge"))
        elif not isinstance(reply, BlobStored):
            kind = type(reply).__name__
            upload.done.set_exception(JobError(ErrorCode.MALFORMED, f"unexpected reply {kind}"))
        else:
            upload.finished_at = time.monotonic()
            upload.done.set_result(None)


class _Acked:
    """An upload's progress as the broker acknowledges its chunks (a publish returns once the
    chunk is queued, long before a slow link has carried it)."""

    def __init__(self, sha256: str, size: int, progress: UploadProgress) -> None:
        self._sha256 = sha256
        self._size = size
        self._progress = progress
        self._lock = threading.Lock()  # acks come from the network thread, maybe out of order
        self._done = 0

    def chunk(self, nbytes: int) -> Callable[[], None]:
        def acked() -> None:
            with self._lock:
                self._done += nbytes
                done = self._done
            self._progress(self._sha256, done, self._size)

        return acked
