"""Sending one job to the gateway until it is answered or its deadline passes: retried after a
timeout under the same job id (the gateway runs it at most once), its module or model uploaded
when the gateway asks, and sent again under the same job id when the connection broke or the
gateway went offline and came back (the gateway's journal answers a job it has seen with its
one answer). Each step is started by the previous one's reply, or by the link being usable
again, so a job in flight holds no thread.

A call's deadline is ``timeout_s`` for each of its ``1 + retries`` attempts, counted from the
start: a wait for a lost gateway spends it. ``patience_s`` shortens the wait for a call that
has somewhere else to go (``auto``: this device).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Protocol

from hearth._blobs import Blob, Uploads
from hearth._connection import Connection
from hearth._futures import running
from hearth._results import Stats
from hearth.errors import ErrorCode, GatewayUnavailable, JobError, NotPaired, QuotaExceeded
from hearth.protocol import (
    DataClass,
    Describe,
    Error,
    NeedBlob,
    OnnxJob,
    PipelineJob,
    Reply,
    TaskInstall,
    WasmJob,
)

__all__ = ["Job", "Link", "Offloader", "Sent", "job_error"]

Job = WasmJob | OnnxJob | PipelineJob | TaskInstall | Describe

_MAX_UPLOADS = 2  # need_blob answers per job: a third means the gateway cannot keep it


class Link(Protocol):
    """The gateway link as a job needs it (``hearth._gateway.GatewayLink``)."""

    def connection(self) -> Connection: ...

    def when_usable(self, until: float) -> Future[Connection]: ...

    def why_unusable(self) -> str: ...


class Offloader:
    def __init__(self, stats: Stats, link: Link, timeout_s: float, retries: int) -> None:
        self.stats = stats
        self.link = link
        self.timeout_s = timeout_s  # per attempt
        self.retries = retries
        self.deadline_s = timeout_s * (1 + retries)  # per call, from its start
        self.uploads = Uploads(stats, timeout_s)

    def submit(
        self,
        conn: Connection | None,
        job: Job,
        blob: Blob,
        correlation: bytes | None = None,
        *,
        patience_s: float | None = None,
    ) -> Sent:
        """Send ``job`` (on ``conn``, or the link's connection). ``Sent.outcome`` is its final
        reply: a result, or JobError for the gateway's error answer, TimeoutError (no answer
        to any attempt), GatewayUnavailable (the gateway was gone and not back in time)."""
        sent = Sent(self, conn, job, blob, correlation=correlation, patience_s=patience_s)
        sent.start()
        return sent


class Sent:
    """One job's way through its attempts, uploads and re-sends."""

    def __init__(
        self,
        offloader: Offloader,
        conn: Connection | None,
        job: Job,
        blob: Blob,
        *,
        correlation: bytes | None,
        patience_s: float | None,
    ) -> None:
        self.offloader = offloader
        self.conn = conn  # the connection that carried the last attempt (and the answer)
        self.job = job
        self.blob = blob
        self.correlation = correlation or job.job_id.encode()  # type: ignore[union-attr]
        self.outcome: Future[Reply] = running()
        self.started = time.monotonic()
        self.deadline = self.started + offloader.deadline_s
        self.patience_s = patience_s  # after a loss, how long to wait (None: the deadline)
        self.attempt = 0
        self.uploads = 0
        self.resent = 0  # times sent again after the gateway came back
        self.sent_at = 0.0
        self._lost_at: float | None = None
        self._lost_why = ""

    @property
    def gateway_id(self) -> str | None:
        """The gateway that answered: the member, when the gateway is a pool (docs/pool.md)."""
        if self.conn is None:
            return None
        return self.conn.member(self.correlation) or self.conn.gateway_id

    def start(self) -> None:
        conn = self.conn
        if conn is None or not conn.usable:
            try:
                conn = self.offloader.link.connection()
            except GatewayUnavailable as exc:
                self._lost(exc)
                return
        self.conn = conn
        self.send()

    def send(self) -> None:
        assert self.conn is not None
        now = time.monotonic()
        self.sent_at = now
        timeout_s = min(self.offloader.timeout_s, self.deadline - now)
        try:
            if timeout_s <= 0:
                raise TimeoutError(
                    f"the call's deadline ({self.offloader.deadline_s:.3g} s) passed"
                )
            reply = self.conn.send(self.job, self.correlation, timeout_s)
        except GatewayUnavailable as exc:
            self._lost(exc)
            return
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits on the job
            self.outcome.set_exception(exc)
            return
        reply.add_done_callback(self._answered)

    def _answered(self, reply_future: Future[Reply]) -> None:
        try:
            reply = reply_future.result()
        except TimeoutError as exc:
            self._timed_out(exc)
            return
        except GatewayUnavailable as exc:
            self._lost(exc)
            return
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits on the job
            self.outcome.set_exception(exc)
            return
        if isinstance(reply, NeedBlob) and self.uploads < _MAX_UPLOADS and self.conn is not None:
            self.uploads += 1
            # A describe carries no label: what it uploads is private, as everything is
            # unless labelled public (the gateway keeps a blob's first label).
            data_class: DataClass = getattr(self.job, "data_class", "private")
            uploaded = self.offloader.uploads.ensure(
                self.conn,
                self.blob,
                reply.max_chunk,
                data_class,
                self.sent_at,
                to=reply.gateway_id if isinstance(reply.gateway_id, str) else None,  # a pool member
            )
            uploaded.add_done_callback(self._uploaded)
            return
        if isinstance(reply, Error):
            self.outcome.set_exception(job_error(reply, getattr(self.job, "job_id", None)))
            return
        self.outcome.set_result(reply)

    def _timed_out(self, exc: TimeoutError) -> None:
        attempts = self.attempt + 1
        if self.attempt >= self.offloader.retries or time.monotonic() >= self.deadline:
            what = "1 attempt" if attempts == 1 else f"{attempts} attempts"
            self.outcome.set_exception(TimeoutError(f"{exc} ({what} under one job id)"))
            return
        self.attempt += 1
        self.offloader.stats.retries += 1
        self.send()  # same job id: the gateway runs it at most once

    def _uploaded(self, upload: Future[None]) -> None:
        exc = upload.exception()
        if isinstance(exc, GatewayUnavailable):
            self.uploads -= 1  # cut off, not refused: it does not count against the job
            self._lost(exc)
        elif exc is not None:
            self.outcome.set_exception(exc)
        else:
            self.send()

    # -- the gateway went away -------------------------------------------------------------

    def _lost(self, exc: GatewayUnavailable) -> None:
        """Wait for the link to be usable again, then send again under the same job id; give
        up at the deadline (or when patience runs out)."""
        if isinstance(exc, NotPaired):  # pairing is needed: waiting will not bring it
            self.outcome.set_exception(exc)
            return
        now = time.monotonic()
        if self._lost_at is None:
            self._lost_at, self._lost_why = now, str(exc) or self.offloader.link.why_unusable()
        until = self.deadline
        if self.patience_s is not None:
            until = min(until, self._lost_at + self.patience_s)
        if until <= now:
            self.outcome.set_exception(self._gave_up())
            return
        self.offloader.link.when_usable(until).add_done_callback(self._back)

    def _back(self, usable: Future[Connection]) -> None:
        exc = usable.exception()
        if isinstance(exc, NotPaired):
            self.outcome.set_exception(exc)
            return
        if exc is not None:
            self.outcome.set_exception(self._gave_up())
            return
        self.conn = usable.result()
        self._lost_at = None
        self.resent += 1
        self.offloader.stats.resent += 1
        self.send()

    def _gave_up(self) -> GatewayUnavailable:
        waited = time.monotonic() - (self._lost_at or self.started)
        if self.patience_s is not None and self.patience_s < self.deadline - (
            self._lost_at or self.started
        ):
            within = f"within {waited:.1f} s"
        else:
            within = f"before the call's deadline ({self.offloader.deadline_s:.3g} s)"
        return GatewayUnavailable(f"{self._lost_why}; the gateway was not back {within}")


def job_error(reply: Error, job_id: str | None) -> JobError:
    """The exception for a gateway's error answer: a QuotaExceeded saying which quota and
    until when, or a plain JobError."""
    if reply.code is ErrorCode.QUOTA_EXCEEDED and isinstance(reply.quota, str):
        resets_at = reply.resets_at if isinstance(reply.resets_at, float) else None
        return QuotaExceeded(reply.message, quota=reply.quota, resets_at=resets_at, job_id=job_id)
    return JobError(reply.code, reply.message, job_id=job_id, where="edge")
