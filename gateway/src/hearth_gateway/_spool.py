"""The large requests of jobs not yet answered, one sealed file each beside the database (the
journal holds them by reference; store.py).

A megabyte written into SQLite costs a write to the WAL, a second one when the WAL is written
back, and free pages to manage once the job is answered; a file of its own is written once and
unlinked once. Files are written without fsync, like the database's commits
(``synchronous=NORMAL``): they survive the daemon's death (SIGKILL), not necessarily a power cut,
after which a request whose file did not survive is dropped (store.py, ``unfinished``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["Spool"]

_BLOCK = 4096  # what a file takes on disk is counted in whole blocks


class Spool:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._dir = directory

    @staticmethod
    def name(client_id: str, job_id: str) -> str:
        """The file of one job's request: a digest of its key, so that no id reaches a path."""
        return hashlib.sha256(f"{client_id}\0{job_id}".encode()).hexdigest()[:40]

    @staticmethod
    def on_disk(size: int) -> int:
        return -(-size // _BLOCK) * _BLOCK

    def write(self, name: str, data: bytes) -> int:
        """Write (or overwrite) one request; returns what it takes on disk."""
        fd = os.open(self._dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return self.on_disk(len(data))

    def read(self, name: str) -> bytes:
        return (self._dir / name).read_bytes()

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (self._dir / name).unlink()

    def sweep(self, keep: set[str]) -> int:
        """Remove the files of no waiting job (written just before a crash, their job never
        journaled); returns how many went."""
        stale = [p.name for p in self._dir.iterdir() if p.name not in keep]
        self.remove(stale)
        return len(stale)
