"""The job ids a client has used, with a digest of each job's content: a job id re-used for a
job with other content is refused with ``conflict`` on this device, whichever side the call
was placed on, as the gateway's journal refuses it (docs/protocol.md §8). Without this, the
device's own runtime, which keeps no journal, would run it, and the same id would mean two
jobs depending on where each ran."""

from __future__ import annotations

import threading
from collections import OrderedDict

import msgspec

from hearth.errors import ErrorCode, JobError
from hearth.protocol import job_digest

__all__ = ["JobIds"]

# Ids remembered per client. An id older than this is forgotten on the device (the gateway's
# journal still holds it for its retention): enough for any retry or re-send window.
MAX_REMEMBERED = 16384


class JobIds:
    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._digests: OrderedDict[str, bytes] = OrderedDict()

    def check(self, job_id: str, job: msgspec.Struct, where: str) -> None:
        """Remember ``job_id`` for ``job``; JobError ``conflict`` if it was used for another."""
        digest = job_digest(job)
        with self._lock:
            known = self._digests.get(job_id)
            if known is None:
                self._digests[job_id] = digest
                if len(self._digests) > self._limit:
                    self._digests.popitem(last=False)
                return
            self._digests.move_to_end(job_id)
        if known != digest:
            raise JobError(
                ErrorCode.CONFLICT,
                f"job id {job_id} was used for a job with other content;"
                " use a new job id for a new job",
                job_id=job_id,
                where=where,
            )
