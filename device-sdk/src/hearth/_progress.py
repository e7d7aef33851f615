"""Progress bars for the ``hearth`` command line: uploads of modules and models, and downloads
of results and snapshots, over ``PROGRESS_MIN_BYTES``, on stderr, with the rate and the time
left; none when stderr is not a terminal (a pipe, a log file, a test), so nothing changes for
scripts."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import IO, Any

from hearth._blobs import UploadProgress

__all__ = ["PROGRESS_MIN_BYTES", "DownloadBar", "UploadBars", "on_terminal"]

PROGRESS_MIN_BYTES = 8 << 20  # smaller uploads take a moment even on a slow link: no bar


def on_terminal() -> bool:
    """Whether bars are drawn: stderr is a terminal and tqdm is installed."""
    if sys.stderr is None or not sys.stderr.isatty():
        return False
    try:
        import tqdm  # noqa: F401 - only whether it is there
    except ImportError:
        return False
    return True


class DownloadBar:
    """A bar for each reply over the threshold while it arrives: ``receiving`` (a client's
    ``receiving``) is polled every ``interval_s`` on a thread of its own, since the MQTT
    network thread hands over a message only once it is whole. ``close()`` is idempotent."""

    def __init__(
        self,
        receiving: Callable[[], tuple[int, int] | None],
        stream: IO[str] | None = None,
        min_bytes: int = PROGRESS_MIN_BYTES,
        interval_s: float = 0.1,
    ) -> None:
        self._receiving = receiving
        self._stream = sys.stderr if stream is None else stream
        self._min_bytes = min_bytes
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._bar: Any = None
        self._thread = threading.Thread(target=self._run, name="hearth-download", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.poll()
        self._end()

    def poll(self) -> None:
        """Draw what has arrived (public for tests; the thread calls it)."""
        arriving = self._receiving()
        if arriving is None or arriving[1] < self._min_bytes:
            self._end()  # a bar open for the packet before: it was received whole
            return
        done, size = arriving
        if self._bar is not None and self._bar.total != size:
            self._end()
        if self._bar is None:
            from tqdm import tqdm

            # tqdm's monitor thread refreshes bars left idle; this one is redrawn every poll.
            tqdm.monitor_interval = 0
            self._bar = tqdm(
                total=size,
                desc="download",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self._stream,
                leave=True,
            )
        self._bar.update(done - self._bar.n)

    def _end(self) -> None:
        if self._bar is not None:
            self._bar.update(self._bar.total - self._bar.n)
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


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
        return cls() if on_terminal() else None

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
