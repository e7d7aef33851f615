"""Sending one job to the gateway until it is answered: retried after a timeout under the same
job id (the gateway runs it at most once), its module or model uploaded when the gateway asks.
Each step is started by the previous one's reply, so a job in flight holds no thread."""

from __future__ import annotations

import time
from concurrent.futures import Future

from hearth._blobs import Blob, Uploads
from hearth._connection import Connection
from hearth._futures import running
from hearth._results import Stats
from hearth.errors import JobError
from hearth.protocol import Error, NeedBlob, OnnxJob, PipelineJob, Reply, TaskInstall, WasmJob

__all__ = ["Job", "Offloader"]

Job = WasmJob | OnnxJob | PipelineJob | TaskInstall

_MAX_UPLOADS = 2  # need_blob answers per job: a third means the gateway cannot keep it


class Offloader:
    def __init__(self, stats: Stats, timeout_s: float, retries: int) -> None:
        self.stats = stats
        self.timeout_s = timeout_s  # per attempt
        self.retries = retries
        self.uploads = Uploads(stats, timeout_s)

    def submit(
        self, conn: Connection, job: Job, blob: Blob, correlation: bytes | None = None
    ) -> Future[Reply]:
        """The job's final reply: a result, or JobError for the gateway's error answer,
        TimeoutError, GatewayUnavailable."""
        submission = _Submission(self, conn, job, blob, correlation)
        submission.send()
        return submission.outcome


class _Submission:
    """One job's way through its attempts and uploads."""

    def __init__(
        self,
        offloader: Offloader,
        conn: Connection,
        job: Job,
        blob: Blob,
        correlation: bytes | None,
    ) -> None:
        self.offloader = offloader
        self.conn = conn
        self.job = job
        self.blob = blob
        self.correlation = correlation or job.job_id.encode()  # type: ignore[union-attr]
        self.outcome: Future[Reply] = running()
        self.attempt = 0
        self.uploads = 0
        self.sent_at = 0.0

    def send(self) -> None:
        self.sent_at = time.monotonic()
        try:
            reply = self.conn.send(self.job, self.correlation, self.offloader.timeout_s)
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits on the job
            self.outcome.set_exception(exc)
            return
        reply.add_done_callback(self._answered)

    def _answered(self, reply_future: Future[Reply]) -> None:
        try:
            reply = reply_future.result()
        except TimeoutError as exc:
            if self.attempt >= self.offloader.retries:
                self.outcome.set_exception(exc)
                return
            self.attempt += 1
            self.offloader.stats.retries += 1
            self.send()  # same job id: the gateway runs it at most once
            return
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits on the job
            self.outcome.set_exception(exc)
            return
        if isinstance(reply, NeedBlob) and self.uploads < _MAX_UPLOADS:
            self.uploads += 1
            uploaded = self.offloader.uploads.ensure(
                self.conn, self.blob, reply.max_chunk, self.job.data_class, self.sent_at
            )
            uploaded.add_done_callback(self._uploaded)
            return
        if isinstance(reply, Error):
            job_id = getattr(self.job, "job_id", None)
            error = JobError(reply.code, reply.message, job_id=job_id, where="edge")
            self.outcome.set_exception(error)
            return
        self.outcome.set_result(reply)

    def _uploaded(self, upload: Future[None]) -> None:
        exc = upload.exception()
        if exc is not None:
            self.outcome.set_exception(exc)
        else:
            self.send()
