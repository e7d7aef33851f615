"""Progress bars for the ``hearth`` command line: uploads of modules and models over
``PROGRESS_MIN_BYTES``, on stderr, with the rate and the time left; none when stderr is not a
terminal (a pipe, a log file, a test), so nothing changes for scripts."""

from __future__ import annotations

import sys
import threading
from typing import IO, Any

from hearth._blobs import UploadProgress

__all__ = ["PROGRESS_MIN_BYTES", "UploadBars"]

PROGRESS_MIN_BYTES = 8 << 20  # smaller uploads take a moment even on a slow link: no bar


class UploadBars:
    """An ``upload_progress`` callback (``hearth.Client.upload_progress``) drawing one bar per
    blob over the threshold. ``close()`` (idempotent) ends any bar left open."""

    def __init__(self, stream: IO[str] | None = None, min_bytes: int = PROGRESS_MIN_BYTES) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._min_bytes = min_bytes
        self._lock = threading.Lock()
        self._bars: dict[str, Any] = {}  # sha256 -> tqdm

    @classmethod
    def for_terminal(cls) -> UploadBars | None:
        """Bars on stderr if it is a terminal and tqdm is installed, else None (no bars)."""
        if sys.stderr is None or not sys.stderr.isatty():
            return None
        try:
            import tqdm  # noqa: F401 - only whether it is there
        except ImportError:
            return None
        return cls()

    @property
    def callback(self) -> UploadProgress:
        return self._update

    def _update(self, sha256: str, done: int, size: int) -> None:
        if size < self._min_bytes:
            return
        from tqdm import tqdm

        with self._lock:
            bar = self._bars.get(sha256)
            if bar is None:
                bar = self._bars[sha256] = tqdm(
                    total=size,
                    desc=f"upload {sha256[:12]}",
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=self._stream,
                    leave=True,
                )
            bar.update(done - bar.n)
            if done >= size:
                bar.close()
                del self._bars[sha256]

    def close(self) -> None:
        with self._lock:
            bars, self._bars = list(self._bars.values()), {}
        for bar in bars:
            bar.close()
