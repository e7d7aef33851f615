"""The protocol boundary: every MQTT message from a device passes here first.

Size check, decode and validation (hearth.protocol), then routing: pings answered at once, blob
chunks to the blob store, jobs through admission into the journal and the worker queue. Every
refusal goes back to the sender as an ``error`` reply with its ErrorCode and is logged once
(rate-limited: a peer must not be able to flood the log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hearth.errors import ErrorCode, ProtocolError
from hearth.protocol import (
    BlobChunk,
    BlobStored,
    Error,
    NeedBlob,
    OnnxJob,
    Ping,
    Pong,
    Reply,
    TaskControl,
    TaskInstall,
    TaskList,
    TaskListResult,
    WasmJob,
    decode_reply,
    decode_request,
    encode,
    parse_request_topic,
    reply_prefix,
)
from hearth_gateway.blobs import BlobStore, UploadRefused
from hearth_gateway.policy import Admission, Policy
from hearth_gateway.runners import TaskEvent, runner_for
from hearth_gateway.store import JournalEntry, Store
from hearth_gateway.workers import QueuedJob, WorkerPool

__all__ = ["Dispatcher", "PeerLog"]

log = logging.getLogger(__name__)

RESERVED_CLIENT_ID = "admin"  # the owner of tasks installed through the control socket

Publish = Callable[[str, bytes, bytes | None, int], None]  # topic, payload, correlation, QoS


class TaskRequests(Protocol):
    """What the dispatcher needs of the task manager (tasks.py imports this module)."""

    def owner_seen(self, client_id: str) -> None: ...
    def install(self, owner: str, request: TaskInstall) -> Reply: ...
    def control(self, client_id: str, request: TaskControl) -> Reply: ...
    def list_tasks(self, client_id: str, request: TaskList | None = None) -> TaskListResult: ...


class PeerLog:
    """Logs a peer-triggered warning at most once per ``interval_s`` per kind, with a count of
    what was suppressed in between."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self._interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, kind: str, fmt: str, *args: object) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(kind, (-self._interval_s, 0))
        if now - last < self._interval_s:
            self._last[kind] = (last, suppressed + 1)
            return
        self._last[kind] = (now, 0)
        if suppressed:
            fmt += " (%d similar suppressed)"
            args = (*args, suppressed)
        log.warning(fmt, *args)


@dataclass
class Counters:
    accepted: int = 0
    refused: int = 0
    duplicates: int = 0
    completed: int = 0
    blob_bytes_received: int = 0


class Dispatcher:
    def __init__(
        self,
        *,
        gateway_id: str,
        policy: Policy,
        store: Store,
        blobs: BlobStore,
        admission: Admission,
        pool: WorkerPool,
        runners: list[str],
        publish: Publish,
        tasks: TaskRequests | None = None,
    ) -> None:
        self._gateway_id = gateway_id
        self._limits = policy.limits
        self._store = store
        self._blobs = blobs
        self._admission = admission
        self._pool = pool
        self._runners = set(runners)
        self._publish = publish
        self.tasks = tasks
        self._peer_log = PeerLog()
        self.counters = Counters()
        self.draining = False  # set on shutdown: new jobs are refused, queued ones finish

    # Called on paho's network thread: everything here is short; jobs run on worker lanes.
    def handle(
        self,
        topic: str,
        payload: bytes,
        response_topic: str | None,
        correlation: bytes | None,
        qos: int = 1,
    ) -> None:
        parsed = parse_request_topic(topic)
        if parsed is None or parsed[0] != self._gateway_id:
            self._peer_log.warning("topic", "ignoring message on unexpected topic %r", topic)
            return
        client_id = parsed[1]
        if client_id == RESERVED_CLIENT_ID:
            # The box owner's identity on the control socket; never a device's.
            self._peer_log.warning("reserved-id", "dropping request from reserved client id %r",
                                   client_id)  # fmt: skip
            self.counters.refused += 1
            return
        if self.tasks is not None:
            self.tasks.owner_seen(client_id)
        if response_topic is None or not response_topic.startswith(reply_prefix(client_id)):
            # Nowhere safe to answer: a device may only have replies sent into its own topics.
            self._peer_log.warning(
                "response-topic",
                "dropping request from %s: Response Topic %r not under %r",
                client_id,
                response_topic,
                reply_prefix(client_id),
            )
            self.counters.refused += 1
            return
        if len(payload) > self._limits.max_message_bytes:
            self._refuse(
                client_id,
                response_topic,
                correlation,
                qos,
                ErrorCode.TOO_LARGE,
                f"message of {len(payload)} bytes over the limit of "
                f"{self._limits.max_message_bytes}",
            )
            return
        try:
            request = decode_request(payload)
        except ProtocolError as exc:
            self._refuse(client_id, response_topic, correlation, qos, exc.code, exc.message)
            return
        if isinstance(request, Ping):
            in_flight = self._admission.in_flight
            pong = Pong(
                gateway_id=self._gateway_id,
                queue_depth=in_flight,
                workers=self._pool.size,
                load=in_flight / max(1, self._pool.size),
            )
            self._publish(response_topic, encode(pong), correlation, qos)
        elif isinstance(request, BlobChunk):
            self._blob(client_id, request, response_topic, correlation, qos)
        elif isinstance(request, TaskInstall | TaskControl | TaskList):
            self._publish(response_topic, encode(self.task_request(client_id, request)),
                          correlation, qos)  # fmt: skip
        else:
            self._job(client_id, request, payload, response_topic, correlation, qos)

    def task_request(self, client_id: str, request: TaskInstall | TaskControl | TaskList) -> Reply:
        if self.tasks is None:
            return Error(code=ErrorCode.UNSUPPORTED, message="tasks are not enabled here")
        if isinstance(request, TaskInstall):
            return self.tasks.install(client_id, request)
        if isinstance(request, TaskControl):
            return self.tasks.control(client_id, request)
        return self.tasks.list_tasks(client_id, request)

    def _blob(
        self,
        client_id: str,
        chunk: BlobChunk,
        response_topic: str,
        correlation: bytes | None,
        qos: int,
    ) -> None:
        self.counters.blob_bytes_received += len(chunk.data)
        try:
            complete = self._blobs.receive(client_id, chunk)
        except UploadRefused as exc:
            self._refuse(client_id, response_topic, correlation, qos, exc.code, exc.message)
            return
        if complete:
            reply = BlobStored(sha256=chunk.sha256, size=chunk.size)
            self._publish(response_topic, encode(reply), correlation, qos)

    def _job(
        self,
        client_id: str,
        job: WasmJob | OnnxJob,
        payload: bytes,
        response_topic: str,
        correlation: bytes | None,
        qos: int,
    ) -> None:
        if self.draining:
            self._refuse(
                client_id,
                response_topic,
                correlation,
                qos,
                ErrorCode.SHUTTING_DOWN,
                "the gateway is shutting down",
                job.job_id,
            )
            return
        runner = runner_for(job)
        if runner not in self._runners:
            self._refuse(
                client_id,
                response_topic,
                correlation,
                qos,
                ErrorCode.UNSUPPORTED,
                f"runner {runner!r} is not enabled on this gateway",
                job.job_id,
            )
            return
        sha = job.module if isinstance(job, WasmJob) else job.model
        if not self._blobs.has(sha):
            need = NeedBlob(job_id=job.job_id, sha256=sha, max_chunk=self._limits.max_chunk_bytes)
            self._publish(response_topic, encode(need), correlation, qos)
            return
        entry = JournalEntry(client_id, job.job_id, payload, response_topic, correlation or b"")
        known = self._store.accept(entry)
        if known is not None:
            state, reply = known
            self.counters.duplicates += 1
            if state == "done" and reply is not None:
                self._publish(response_topic, reply, correlation, qos)
            # else: still queued or running; its one answer is on its way.
            return
        self.enqueue(client_id, job, response_topic, correlation or b"", sha, qos)

    def enqueue(
        self,
        client_id: str,
        job: WasmJob | OnnxJob,
        response_topic: str,
        correlation: bytes,
        sha: str,
        qos: int = 1,
    ) -> None:
        """Admit a journaled job and queue it (also used to resume the journal on start)."""
        refusal = self._admission.admit(client_id)
        if refusal is not None:
            self._store.forget(client_id, job.job_id)
            reason = (
                "the gateway's queue is full"
                if refusal is ErrorCode.OVERLOADED
                else "too many jobs in flight for this device"
            )
            self._refuse(client_id, response_topic, correlation, qos, refusal, reason, job.job_id)
            return
        self.counters.accepted += 1
        self._pool.submit(
            QueuedJob(
                client_id=client_id,
                job=job,
                blob_path=str(self._blobs.path(sha)),
                response_topic=response_topic,
                correlation=correlation,
                qos=qos,
            )
        )

    def resume(self) -> int:
        """Queue the jobs a previous run accepted but never answered."""
        entries = self._store.unfinished()
        for entry in entries:
            try:
                job = decode_request(entry.request)
            except ProtocolError:  # written by an older, incompatible version
                self._store.forget(entry.client_id, entry.job_id)
                continue
            assert isinstance(job, WasmJob | OnnxJob)
            sha = job.module if isinstance(job, WasmJob) else job.model
            self.enqueue(entry.client_id, job, entry.response_topic, entry.correlation, sha)
        return len(entries)

    def completed(self, item: QueuedJob, reply: bytes, final: bool) -> None:
        """Worker pool callback: store the answer (unless a retry should run the job again),
        then publish it, then free the slot."""
        if len(reply) > self._limits.max_message_bytes:
            # The broker would drop us for a packet over its limit: answer with the reason.
            reply = encode(Error(code=ErrorCode.TOO_LARGE, job_id=item.job.job_id,
                                 message=f"result of {len(reply)} bytes over the limit of "
                                         f"{self._limits.max_message_bytes}"))  # fmt: skip
        elif len(reply) < 1024:  # errors are small; results rarely are
            self._check_blob(item, reply)
        try:
            if final:
                self._store.finish(item.client_id, item.job.job_id, reply)
            else:
                self._store.forget(item.client_id, item.job.job_id)
            self._publish(item.response_topic, reply, item.correlation or None, item.qos)
        finally:
            self._admission.release(item.client_id)
            self.counters.completed += 1

    def _check_blob(self, item: QueuedJob, reply: bytes) -> None:
        """A stored blob that no longer matches its hash (disk corruption, tampering) is
        removed, so the next job naming it asks the device to upload it again."""
        try:
            decoded = decode_reply(reply)
        except ProtocolError:
            return
        job = item.job
        if isinstance(decoded, Error) and decoded.code is ErrorCode.HASH_MISMATCH:
            sha = job.module if isinstance(job, WasmJob | TaskEvent) else job.model
            log.warning("stored blob %s failed its hash check; removed", sha[:12])
            self._blobs.discard(sha)

    def _refuse(
        self,
        client_id: str,
        response_topic: str,
        correlation: bytes | None,
        qos: int,
        code: ErrorCode,
        message: str,
        job_id: str | None = None,
    ) -> None:
        self.counters.refused += 1
        self._peer_log.warning(
            str(code), "refused request from %s: %s: %s", client_id, code, message
        )
        error = Error(code=code, message=message, job_id=job_id)
        self._publish(response_topic, encode(error), correlation, qos)
