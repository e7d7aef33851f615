"""The protocol boundary: every MQTT message from a device passes here first.

Size check, decode and validation (hearth.protocol), then routing: pings answered at once, blob
chunks to the blob store, jobs through admission into the journal and the worker queue. A job's
journal row is held a few milliseconds (store.py): ``handle`` returns its Receipt, and the link
acknowledges the request once the receipt is durable. Answers of journaled jobs are stored, then
published, at the end of the loop's turn (``flush``): one commit for all that finished. Every
refusal goes back to the sender as an ``error`` reply with its ErrorCode and is logged once
(rate-limited: a peer must not be able to flood the log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import msgspec

from hearth.errors import ErrorCode, JobError, ProtocolError
from hearth.protocol import (
    Accepted,
    BlobChunk,
    BlobStored,
    CallJob,
    CallResult,
    Describe,
    Error,
    FrameDropped,
    NeedBlob,
    OnnxJob,
    Ping,
    PipelineJob,
    Pong,
    Reply,
    Request,
    Requirements,
    RunAck,
    RunControl,
    RunMoved,
    RunResume,
    RunStart,
    SessionClose,
    SessionClosed,
    Task,
    TaskControl,
    TaskInstall,
    TaskList,
    TaskListResult,
    Usage,
    UsageResult,
    WasmJob,
    decode_reply,
    decode_request,
    encode,
    job_digest,
    parse_request_topic,
    reply_prefix,
)
from hearth.runtime._blob import WASM_MAGIC
from hearth_gateway.blobs import BlobStore, UploadRefused
from hearth_gateway.fit import Fit, Resources
from hearth_gateway.loop import Timer
from hearth_gateway.metrics import JobRecord, Metrics
from hearth_gateway.peer_ids import is_peer_id, peer_request_refusal
from hearth_gateway.placement import Action, Decision, PlacedJob, Placer, forwardable
from hearth_gateway.policy import Admission, Policy
from hearth_gateway.quota import QuotaRefusal, Quotas, app_of, run_seconds
from hearth_gateway.reply_to import PublishReply, ReplyTo
from hearth_gateway.runners import Inspect, Job, TaskEvent, VisionClose, runner_for
from hearth_gateway.runs import REASON_OVERLOADED, Runs, in_pieces
from hearth_gateway.storage import StorageGuard, is_storage_full
from hearth_gateway.store import CONFLICT, JournalEntry, Receipt, Store
from hearth_gateway.streams import Sessions, StreamCounters
from hearth_gateway.upstream import Forwarded, Forwarder

if TYPE_CHECKING:
    from hearth_gateway.peers import Peers
from hearth_gateway.vision import CAPABILITIES, STATEFUL
from hearth_gateway.workers import QueuedJob, WorkerPool

__all__ = ["Dispatcher", "PeerLog"]

log = logging.getLogger(__name__)

RESERVED_CLIENT_ID = "admin"  # the owner of tasks installed through the control socket
_FULL = "the gateway's storage is full; retry later or elsewhere"
_UNJOURNALED_KEPT = 1024  # answers kept in memory while the journal cannot take them
# An answer is decoded only when it may be this error (the code's bytes are in it): the daemon
# passes the worker's encoded answer on as it is.
_HASH_MISMATCH = str(ErrorCode.HASH_MISMATCH).encode()
# How long a job's accept row is held before it is written: a job answered within it is
# journaled once, answered (a no-op job takes under a millisecond; a 1 MiB frame about ten).
JOURNAL_DELAY_S = 0.01


def _blob_of(job: Job) -> str | None:
    if isinstance(job, WasmJob | TaskEvent | RunStart | RunResume):
        return job.module
    if isinstance(job, Inspect):
        return job.blob
    if isinstance(job, OnnxJob | PipelineJob):
        return job.model
    return None


def _blobs_needed(job: Job) -> tuple[str, ...]:
    """Every blob a job names: its module or model, and a resumed run's snapshot."""
    if isinstance(job, RunResume):
        return (job.module, job.snapshot)
    sha = _blob_of(job)
    return (sha,) if sha is not None else ()


def _call_refusal(job: CallJob) -> JobError | None:
    """A capability call that names no known capability, or lacks its stream or session."""
    if job.capability not in CAPABILITIES:
        return JobError(
            ErrorCode.UNKNOWN_CAPABILITY,
            f"no capability {job.capability!r}; this gateway has {', '.join(sorted(CAPABILITIES))}",
        )
    if job.capability == "vision.odometry" and not job.session:
        return JobError(ErrorCode.BAD_PARAMS, f"{job.capability} needs a session name")
    if job.capability != "vision.odometry" and job.session:
        return JobError(ErrorCode.BAD_PARAMS, "sessions are for vision.odometry only")
    if job.capability in STATEFUL - {"vision.odometry"} and not job.stream:
        return JobError(ErrorCode.BAD_PARAMS, f"{job.capability} needs a stream name")
    return None


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
    forwarded: int = 0  # public jobs sent to the upstream gateway


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
        publish: PublishReply,
        placer: Placer,
        upstream: Forwarder | None = None,
        tasks: TaskRequests | None = None,
        streams: StreamCounters | None = None,
        locked: frozenset[str] = frozenset(),
        storage: StorageGuard | None = None,
        pool_id: str = "",
        resources: Callable[[], Resources] | None = None,
        peers: Peers | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._gateway_id = gateway_id
        # The cloud-tier pool this gateway is a member of (docs/protocol.md §19); "": none.
        self._pool_id = pool_id or gateway_id
        self._peers = peers  # paired LAN gateways (peers.py); None: none
        self._metrics = metrics or Metrics()  # counters and the page's job list (metrics.py)
        self._storage = storage  # None: no free-space check (journal errors still map)
        # Answers published while the disk was too full to journal them, for a re-sent job id
        # (its entry still says accepted: without this it would hear nothing until a restart).
        self._unjournaled: dict[tuple[str, str], bytes] = {}
        self._limits = policy.limits
        self._store = store
        self._blobs = blobs
        self._admission = admission
        self._pool = pool
        self._runners = set(runners)
        self._publish = publish
        self._placer = placer  # where each job runs (placement.py)
        self._upstream = upstream  # None: no upstream configured
        self._tasks = tasks  # None: the task runner is not enabled
        self._peer_log = PeerLog()
        self.counters = Counters()
        self.sessions = Sessions(
            idle_timeout_s=policy.vision.session_idle_timeout_s,
            max_per_client=policy.vision.max_sessions_per_client,
        )
        # The daemon passes its own: the status reports them before a dispatcher exists.
        self.streams = StreamCounters(policy.vision.max_streams) if streams is None else streams
        # Migratable runs in flight (runs.py), steered through the worker that runs each.
        self.runs = Runs(steer=self._steer)
        self._evict_over = policy.migration.evict_when_queue_over
        self.draining = False  # set on shutdown: new jobs are refused, queued ones finish
        self.locked = locked  # revoked device ids; the daemon updates it (pairing.py)
        self._held_timer: Timer | None = None  # when the oldest held journal row is due
        # Per-device and per-application quotas (quota.py), and whether a job's requires fit
        # here (fit.py); the daemon says what this box has.
        self.quotas = Quotas(policy.quotas, store)
        self.fit = Fit(resources or Resources, self._waiting_per_worker)

    def _waiting_per_worker(self) -> float:
        return self._pool.pending / max(1, self._pool.size)

    # Called from the daemon's event loop for each request: everything here is short; jobs run
    # in the worker processes.
    def handle(  # noqa: PLR0911 - one return per refusal
        self, topic: str, payload: bytes, reply_to: ReplyTo
    ) -> Receipt | None:
        """Route one request. Returns the Receipt of a job just journaled (its request is
        acknowledged once the receipt is durable); None: acknowledge it now."""
        parsed = parse_request_topic(topic)
        # The link took the sender from the topic's last level: the protocol's parse has the
        # last word on it.
        to = parsed[0] if parsed is not None and parsed[1] == reply_to.client_id else None
        if to is None or to not in (self._gateway_id, self._pool_id):
            self._peer_log.warning("topic", "ignoring message on unexpected topic %r", topic)
            return None
        client_id = reply_to.client_id
        if self._identity_refused(topic, reply_to):
            return None
        if self._tasks is not None:
            self._tasks.owner_seen(client_id)
        if not reply_to.topic.startswith(reply_prefix(client_id)):
            # Nowhere safe to answer: a device may only have replies sent into its own topics.
            self._peer_log.warning(
                "response-topic",
                "dropping request from %s: Response Topic %r not under %r",
                client_id,
                reply_to.topic or None,
                reply_prefix(client_id),
            )
            self.counters.refused += 1
            return None
        if len(payload) > self._limits.max_message_bytes:
            self._refuse(
                reply_to,
                ErrorCode.TOO_LARGE,
                f"message of {len(payload)} bytes over the limit of "
                f"{self._limits.max_message_bytes}",
            )
            return None
        try:
            request = decode_request(payload)
        except ProtocolError as exc:
            self._refuse(reply_to, exc.code, exc.message)
            return None
        if is_peer_id(client_id) and (why := peer_request_refusal(request)) is not None:
            self._store.audit(client_id, "peer", type(request).__name__, "refused", why)
            self._refuse(reply_to, ErrorCode.FORBIDDEN, why, getattr(request, "job_id", None))
            return None
        # The pool's topic: the broker gave this request to this member.
        route = self._route if to == self._gateway_id else self._pooled
        return route(request, payload, reply_to)

    def _pooled(self, request: Request, payload: bytes, reply_to: ReplyTo) -> Receipt | None:
        """A request sent to the pool. Only jobs (and pings) are shared: anything that leaves
        state on the member that gets it (a blob, a task, a session) must be sent to one
        member's own id, named by ``accepted`` or ``need_blob``."""
        if isinstance(request, Ping) or forwardable(request):
            return self._route(request, payload, reply_to, pooled=True)
        message = f"a {type(request).__name__} goes to a member's own id, not to the pool"
        self._refuse(reply_to, ErrorCode.UNSUPPORTED, message, getattr(request, "job_id", None))
        return None

    def _route(
        self, request: Request, payload: bytes, reply_to: ReplyTo, *, pooled: bool = False
    ) -> Receipt | None:
        if isinstance(request, Ping):
            in_flight = self._admission.in_flight
            pong = Pong(
                gateway_id=self._gateway_id,
                queue_depth=in_flight,
                workers=self._pool.size,
                load=in_flight / max(1, self._pool.size),
            )
            self._publish(reply_to, encode(pong))
        elif isinstance(request, BlobChunk):
            self._blob(request, reply_to)
        elif isinstance(request, TaskInstall | TaskControl | TaskList):
            reply = self._device_task_request(reply_to.client_id, request)
            self._publish(reply_to, encode(reply))
        elif isinstance(request, SessionClose):
            self._session_close(request, reply_to)
        elif isinstance(request, RunControl):
            self._run_control(request, reply_to)
        elif isinstance(request, CallJob) and (request.stream or request.session):
            self._frame(request, reply_to)
        elif isinstance(request, Describe):
            self._describe(request, reply_to)
        elif isinstance(request, Usage):
            usage = UsageResult(usage=self.quotas.usage(reply_to.client_id))
            self._publish(reply_to, encode(usage))
        else:
            return self._job(request, payload, reply_to, pooled=pooled)
        return None

    def _device_task_request(
        self, client_id: str, request: TaskInstall | TaskControl | TaskList
    ) -> Reply:
        """A task install goes where placement says (a cloud tier installs only public tasks);
        audited when refused, or once installed (not for a need_blob on the way)."""
        if not isinstance(request, TaskInstall):
            return self.task_request(client_id, request)
        decision = self._placer.place_task(request)
        what = f"task {request.name}"
        if decision.action is Action.DENY and decision.code is not None:
            self._placer.audit(client_id, request.data_class, what, decision)
            self.counters.refused += 1
            return Error(code=decision.code, message=decision.reason)
        app = app_of(client_id, request.app)
        over = self.quotas.task_refusal(client_id, app)
        if over is not None:
            self.counters.refused += 1
            return over.error()
        reply = self.task_request(client_id, request)
        if isinstance(reply, Task):
            self._placer.audit(client_id, request.data_class, what, decision)
            self.quotas.installed(reply.task.task_id, client_id, app)
        return reply

    def task_request(self, client_id: str, request: TaskInstall | TaskControl | TaskList) -> Reply:
        if self._tasks is None:
            return Error(code=ErrorCode.UNSUPPORTED, message="tasks are not enabled here")
        if isinstance(request, TaskInstall):
            return self._tasks.install(client_id, request)
        if isinstance(request, TaskControl):
            return self._tasks.control(client_id, request)
        return self._tasks.list_tasks(client_id, request)

    def _blob(self, chunk: BlobChunk, reply_to: ReplyTo) -> None:
        client_id = reply_to.client_id
        self.counters.blob_bytes_received += len(chunk.data)
        if chunk.data_class == "private" and self._placer.tier == "cloud":
            # A device (or a buggy home gateway) sending private bytes to a cloud tier: they
            # have crossed already, but they are not kept, and the sender learns why.
            reason = "private blobs are not accepted by a cloud tier"
            self._store.audit(client_id, "blob", chunk.sha256, "refused", reason)
            self._refuse(reply_to, ErrorCode.POLICY_DENIED, reason)
            return
        app = app_of(client_id, chunk.app)
        if chunk.offset == 0 and not self._blobs.has(chunk.sha256):
            over = self.quotas.store_refusal(client_id, app, chunk.size)
            if over is not None:
                self._refuse_quota(reply_to, over)
                return
        try:
            complete = self._blobs.receive(client_id, chunk)
        except UploadRefused as exc:
            if exc.code is ErrorCode.HASH_MISMATCH:  # tampered with, or a broken sender
                self._store.audit(client_id, "blob", chunk.sha256, "refused", exc.message)
            self._refuse(reply_to, exc.code, exc.message)
            return
        if complete:
            self.quotas.stored(chunk.sha256, client_id, app, chunk.size)
            self._publish(reply_to, encode(BlobStored(sha256=chunk.sha256, size=chunk.size)))

    def _describe(self, request: Describe, reply_to: ReplyTo) -> None:
        """A stored blob's inputs and outputs (a model) or imports and exports (a module), from
        the runner of its kind in a worker: the daemon reads four bytes of it, nothing more."""
        if self.draining:
            self._refuse(reply_to, ErrorCode.SHUTTING_DOWN, "the gateway is shutting down")
            return
        if not self._blobs.has(request.blob):
            max_chunk = self._limits.max_chunk_bytes
            need = NeedBlob(job_id=request.job_id, sha256=request.blob, max_chunk=max_chunk)
            self._publish(reply_to, encode(need))
            return
        path = self._blobs.path(request.blob)
        try:
            with path.open("rb") as blob:
                runner = "wasm" if blob.read(4) == WASM_MAGIC else "onnx"
        except OSError as exc:
            self._refuse(reply_to, ErrorCode.INTERNAL, f"blob unreadable: {exc.strerror}")
            return
        if runner not in self._runners:
            message = f"runner {runner!r} is not enabled on this gateway"
            self._refuse(reply_to, ErrorCode.UNSUPPORTED, message, request.job_id)
            return
        job = Inspect(job_id=request.job_id, blob=request.blob, runner=runner)
        # Like a job, but neither journaled (it is answered afresh each time) nor admitted
        # against the device's quota (it is brief, and holds no slot of its own).
        self._pool.submit(
            QueuedJob(
                reply_to=reply_to,
                job=job,
                blob_path=str(path),
                journaled=False,
                admitted=False,
            )
        )

    def _placed(self, client_id: str, job: PlacedJob) -> tuple[Decision, JobError | None]:
        """Placement's decision and why the job is refused, if it is; a refusal of
        placement's own is audited here."""
        decision = self._placer.place(job, client_id)
        self._metrics.placed(decision.action.value, decision.reason)
        refusal = self._refusal(job, decision)
        if refusal is not None and refusal.code is decision.code:
            self._audit(client_id, job, decision)
        return decision, refusal

    def _audit(self, client_id: str, job: PlacedJob, decision: Decision) -> None:
        self._placer.audit(client_id, job.data_class, f"job {job.job_id}", decision)

    def _refusal(self, job: PlacedJob, decision: Decision) -> JobError | None:
        """Why this job cannot run here at all, checked before anything is stored."""
        if self.draining:
            return JobError(ErrorCode.SHUTTING_DOWN, "the gateway is shutting down")
        if decision.action is Action.DENY and decision.code is not None:
            return JobError(decision.code, decision.reason)
        if decision.action in (Action.UPSTREAM, Action.PEER):
            # Its runner may be missing here: that may be why it goes upstream.
            return _call_refusal(job) if isinstance(job, CallJob) else None
        runner = runner_for(job)
        if runner not in self._runners:
            return JobError(
                ErrorCode.UNSUPPORTED, f"runner {runner!r} is not enabled on this gateway"
            )
        if isinstance(job, CallJob):
            return _call_refusal(job) or self._unfit(job)
        return self._unfit(job)

    def _unfit(self, job: PlacedJob) -> JobError | None:
        """A job whose ``requires`` this gateway cannot meet (fit.py)."""
        needs = getattr(job, "requires", None)
        if not isinstance(needs, Requirements):
            return None
        why = self.fit.refusal(needs, wasm=isinstance(job, WasmJob))
        if why is None:
            return None
        return JobError(ErrorCode.UNSATISFIABLE, f"gateway {self._gateway_id}: {why}")

    def _job(  # noqa: PLR0911 - one return per outcome
        self, job: PlacedJob, payload: bytes, reply_to: ReplyTo, *, pooled: bool = False
    ) -> Receipt | None:
        client_id = reply_to.client_id
        decision, refusal = self._placed(client_id, job)
        if refusal is not None:
            self._refuse(reply_to, refusal.code, refusal.message, job.job_id)
            return None
        if self._storage is not None and not self._storage.room_for(len(payload)):
            # Before need_blob too: an upload would only be refused in turn.
            self._refuse(reply_to, ErrorCode.STORAGE_FULL, _FULL, job.job_id)
            return None
        missing = next((sha for sha in _blobs_needed(job) if not self._blobs.has(sha)), None)
        if missing is not None:
            max_chunk = self._limits.max_chunk_bytes
            need = NeedBlob(job_id=job.job_id, sha256=missing, max_chunk=max_chunk)
            if pooled:  # the upload and the job again come to this member, not to the pool
                need = msgspec.structs.replace(need, gateway_id=self._gateway_id)
            self._publish(reply_to, encode(need))
            return None
        digest = job_digest(job)  # the SDK re-sends the same job: the same digest
        entry = JournalEntry(
            client_id, job.job_id, payload, reply_to.topic, reply_to.correlation, digest
        )
        audit = Placer.entry(client_id, job.data_class, f"job {job.job_id}", decision)
        known = self._store.accept_later(entry, audit, JOURNAL_DELAY_S)
        if pooled and (isinstance(known, Receipt) or known[0] != CONFLICT):
            # The submitter sends any re-send of this job id here (docs/protocol.md §19).
            self._publish(
                reply_to, encode(Accepted(job_id=job.job_id, gateway_id=self._gateway_id))
            )
        if not isinstance(known, Receipt):
            self._seen_again(job, known, reply_to)
            return None
        if self._held_timer is None:
            self._held_timer = self._pool.loop.call_later(JOURNAL_DELAY_S, self._held_due)
        where = decision.action.value
        record = JobRecord(
            client_id, job.job_id, runner_for(job), where, decision.reason, time.time()
        )
        self._metrics.job_accepted(record)
        if decision.action is Action.UPSTREAM and self._upstream is not None:
            # Never a run: runs are not forwardable (placement.py); they move through devices.
            assert not isinstance(job, RunStart | RunResume)
            self.counters.forwarded += 1
            self._upstream.forward(job, reply_to, decision.reason)
            return known
        if decision.action is Action.PEER and self._peers is not None:
            assert not isinstance(job, RunStart | RunResume)  # not forwardable
            self.counters.forwarded += 1
            self._peers.forward(job, reply_to, decision)
            return known
        self.enqueue(job, reply_to)
        return known

    def _seen_again(
        self, job: PlacedJob, known: tuple[str, bytes | None], reply_to: ReplyTo
    ) -> None:
        """A job id already journaled: its stored answer, or nothing while it runs; refused
        when that id was used for a job with other content."""
        state, reply = known
        client_id = reply_to.client_id
        if state == CONFLICT:
            message = (
                f"job id {job.job_id} was used for a job with other content;"
                " use a new job id for a new job"
            )
            self._refuse(reply_to, ErrorCode.CONFLICT, message, job.job_id)
            return
        self.counters.duplicates += 1
        if state == "done" and reply is not None:
            self._publish(reply_to, reply)
        elif (kept := self._unjournaled.pop((client_id, job.job_id), None)) is not None:
            self._publish(reply_to, kept)
            self._store.finish(client_id, job.job_id, kept)  # there is room again
        # else: still queued or running; its one answer is on its way.

    # -- public jobs forwarded upstream (upstream.py) -----------------------------------------

    def forwarded(self, item: Forwarded, reply: bytes) -> None:
        """The upstream's answer to a forwarded job (its job id already the device's): stored,
        then published to the device like any answer."""
        if len(reply) > self._limits.max_message_bytes:
            reply = self._too_large(item.job, len(reply))
        self._store.finish(item.reply_to.client_id, item.job.job_id, reply)
        self._publish(item.reply_to, reply)
        self.counters.completed += 1
        self._metrics.job_finished(
            item.reply_to.client_id, item.job.job_id, runner_for(item.job), reply, None
        )

    def forward_failed(self, item: Forwarded, why: str) -> None:
        """A forwarded job the upstream will not answer: it is public, so it runs here."""
        job = item.job
        client_id = item.reply_to.client_id
        self._audit(client_id, job, Decision(Action.QUEUE, f"back from the {why}"))
        runner = runner_for(job)
        if runner not in self._runners:
            self._store.forget(client_id, job.job_id)
            message = f"runner {runner!r} is not enabled on this gateway ({why})"
            self._refuse(item.reply_to, ErrorCode.UNSUPPORTED, message, job.job_id)
            return
        self.enqueue(job, item.reply_to)

    def enqueue(self, job: PlacedJob, reply_to: ReplyTo) -> None:
        """Admit a journaled job and queue it (also used to resume the journal on start)."""
        if not self._admit(job, reply_to):
            self._store.forget(reply_to.client_id, job.job_id)
            return
        sha = _blob_of(job)
        blob_path = str(self._blobs.path(sha)) if sha else ""
        snapshot, key = "", b""
        if isinstance(job, RunResume):
            snapshot = str(self._blobs.path(job.snapshot))
            key = self._blobs.snapshot_key(job.snapshot)  # sealed at rest (blobs.py)
        queued = QueuedJob(reply_to=reply_to, job=job, blob_path=blob_path)
        queued.snapshot_path, queued.snapshot_key = snapshot, key
        if isinstance(job, RunStart | RunResume):
            self.runs.accepted(queued)
        self._pool.submit(queued)
        if self._evict_over and self._pool.pending > self._evict_over and self.runs:
            # Saturated: a run can finish at its device; work that cannot move waits here.
            self.runs.move_oldest(REASON_OVERLOADED)

    # -- migratable runs (runs.py, docs/migration.md) ----------------------------------------

    def _run_control(self, request: RunControl, reply_to: ReplyTo) -> None:
        refusal = self.runs.control(
            reply_to.client_id, request.run_id, request.action, request.received
        )
        if request.action == "received":
            return  # flow control's acknowledgement: never answered (docs/protocol.md §18)
        if refusal is not None:
            message = f"no run {request.run_id} of yours is in flight here"
            self._refuse(reply_to, refusal, message, request.run_id)
            return
        self._publish(reply_to, encode(RunAck(run_id=request.run_id, action=request.action)))

    def _steer(self, item: QueuedJob, action: str, received: int = 0) -> bool:
        return self._pool.steer(item, action, received)

    def started(self, item: QueuedJob) -> None:
        """Worker pool callback: a worker took ``item``."""
        self.runs.started(item)

    def progress(self, item: QueuedJob, frame: bytes) -> None:
        """Worker pool callback: a run's checkpoint, to its device (too large for one message:
        in run_chunk pieces, runs.in_pieces)."""
        limits = self._limits
        pieces = in_pieces(frame, limits.max_message_bytes, limits.max_chunk_bytes)
        for piece in pieces or ([frame] if len(frame) <= limits.max_message_bytes else []):
            self._publish(item.reply_to, piece)

    def _run_answer(self, item: QueuedJob, reply: bytes) -> bytes:
        """A run's answer, with why it moved (the worker only knows that it was asked to)."""
        active = self.runs.ended(item)
        if active is None or not active.reason:
            return reply
        try:
            decoded = decode_reply(reply)
        except ProtocolError:
            return reply
        if not isinstance(decoded, RunMoved):
            return reply
        if active.cancelled:
            message = f"run {decoded.run_id} cancelled by its device"
            return encode(Error(code=ErrorCode.CANCELLED, message=message, job_id=decoded.job_id))
        reason, to = active.reason, ""
        if reason == REASON_OVERLOADED:  # placement says where it goes (placement.py)
            job = item.job
            assert isinstance(job, RunStart | RunResume)
            decision = self._placer.place_run_move(job)
            if decision.action in (Action.UPSTREAM, Action.DENY, Action.PEER):  # not "home"
                self._audit(item.reply_to.client_id, job, decision)
            if decision.action is Action.UPSTREAM:
                reason, to = f"{reason}: to its upstream {decision.target}", decision.target
            elif decision.action is Action.PEER:  # peers.py: the reason names peer and address
                reason, to = f"{reason}: {decision.reason}", decision.target
        return encode(msgspec.structs.replace(decoded, reason=reason, to=to))

    def _admit(self, job: PlacedJob, reply_to: ReplyTo) -> bool:
        app = app_of(reply_to.client_id, job.app)
        over = self.quotas.job_refusal(reply_to.client_id, app)
        if over is not None:
            self._refuse_quota(reply_to, over, job.job_id)
            return False
        refusal = self._admission.admit(reply_to.client_id)
        if refusal is not None:
            reason = (
                "the gateway's queue is full"
                if refusal is ErrorCode.OVERLOADED
                else "too many jobs in flight for this device"
            )
            self._refuse(reply_to, refusal, reason, job.job_id)
            return False
        self.quotas.started(reply_to.client_id, app)
        self.counters.accepted += 1
        return True

    # -- camera streams and sessions ----------------------------------------------------------

    def _frame(self, job: CallJob, reply_to: ReplyTo) -> None:
        """A frame of a stream or session: not journaled (a frame is worth something only
        now), latest frame wins per stream, stateful capabilities pinned to one worker.
        Frames always run here (they need state held here); only refusals are audited."""
        client_id = reply_to.client_id
        _, refusal = self._placed(client_id, job)
        session_new = False
        session_key = f"{client_id}/{job.session}" if job.session else None
        if refusal is None and session_key is not None:
            try:
                session_new = self.sessions.use(client_id, session_key)
            except JobError as exc:
                refusal = exc
        if refusal is not None:
            self._refuse(reply_to, refusal.code, refusal.message, job.job_id)
            return
        stream_key = f"{client_id}/{job.stream}" if job.stream else None
        affinity = None
        if job.capability in STATEFUL:
            affinity = session_key if job.capability == "vision.odometry" else stream_key
        queued = QueuedJob(
            reply_to=reply_to,
            job=job,
            blob_path="",
            affinity=affinity,
            latest=stream_key,
            session_new=session_new,
            journaled=False,
        )
        if stream_key is not None and self._pool.waiting(stream_key) is not None:
            # The camera outruns the box: the waiting frame gives its slot (and its admission)
            # to this newer one, and its sender learns at once that it was dropped.
            old = self._pool.supersede(queued)
            assert isinstance(old.job, CallJob)
            dropped = self.streams.dropped(stream_key)
            self._metrics.frame_dropped(stream_key)
            note = FrameDropped(job_id=old.job.job_id, stream=job.stream or "", dropped=dropped)
            self._publish(old.reply_to, encode(note))
            return
        if self._admit(job, reply_to):
            self._pool.submit(queued)
        elif session_new and session_key is not None:
            self.sessions.forget(session_key)  # refused before it opened: a retry may open it

    def _session_close(self, request: SessionClose, reply_to: ReplyTo) -> None:
        key = f"{reply_to.client_id}/{request.session}"
        if not self.sessions.is_open(key):
            closed = SessionClosed(session=request.session, frames=0)
            self._publish(reply_to, encode(closed))
            return
        self.close_session(key, "was closed", reply_to)

    def close_session(self, key: str, why: str, reply_to: ReplyTo | None = None) -> None:
        """Close a session: the worker holding it drops its state (queued behind the session's
        frames, so those still finish). ``reply_to`` None: nobody to tell (idle)."""
        frames = self.sessions.close(key, why)
        if reply_to is None:
            reply_to = ReplyTo(key.split("/", 1)[0], "")
        self._pool.submit(
            QueuedJob(
                reply_to=reply_to,
                job=VisionClose(job_id=f"close-{frames}", session=key),
                blob_path="",
                affinity=key,
                journaled=False,
                admitted=False,
            )
        )

    def expire_sessions(self) -> int:
        """Close the sessions that have gone idle (called from the daemon's housekeeping)."""
        idle = self.sessions.idle()
        for key in idle:
            self.close_session(key, "was closed after its idle timeout")
        return len(idle)

    def resume(self) -> int:
        """Queue the jobs a previous run accepted but never answered (at QoS 1)."""
        entries = self._store.unfinished()
        for entry in entries:
            try:
                job = decode_request(entry.request)
            except ProtocolError:  # written by an older, incompatible version
                self._store.forget(entry.client_id, entry.job_id)
                continue
            assert isinstance(job, WasmJob | OnnxJob | CallJob | PipelineJob | RunStart | RunResume)
            self.enqueue(job, ReplyTo(entry.client_id, entry.response_topic, entry.correlation))
        return len(entries)

    def completed(self, item: QueuedJob, reply: bytes, final: bool) -> None:
        """Worker pool callback: store the answer (unless a retry should run the job again),
        publish it, then free the slot. A journaled job's answer is published at once and
        written by the commit at the end of this turn, which its request's PUBACK waits for:
        the commit is not on the answer's way. A gateway that dies in between has sent an
        answer it will send again: the job runs again once the broker delivers its request
        again (or, accepted earlier, from the journal at the next start; docs/protocol.md
        §8)."""
        job = item.job
        if isinstance(job, VisionClose):
            self._pool.forget_affinity(job.session)
            if item.reply_to.topic:
                self._publish(item.reply_to, reply)
            return
        if item.latest is not None:
            reply = self._with_dropped(reply, self.streams.get(item.latest))
        pieces = None
        if isinstance(job, RunStart | RunResume):
            reply = self._run_answer(item, reply)
            limits = self._limits
            pieces = in_pieces(reply, limits.max_message_bytes, limits.max_chunk_bytes)
        if pieces is None and len(reply) > self._limits.max_message_bytes:
            # The broker would drop us for a packet over its limit: answer with the reason.
            reply = self._too_large(job, len(reply))
        elif len(reply) < 1024 and _HASH_MISMATCH in reply:  # errors are small; results rarely are
            self._check_blob(item, reply)
        client_id = item.reply_to.client_id
        try:
            if item.journaled and final and pieces is None:
                # Stored with whatever else ends in this turn (flush).
                self._store.finish(client_id, job.job_id, reply, batch=True)
                self._publish(item.reply_to, reply)
                return
            if item.journaled:
                self._journal_answer(client_id, job.job_id, reply, final)
            for piece in pieces or [reply]:
                self._publish(item.reply_to, piece)
        finally:
            if item.admitted:
                self._admission.release(client_id)
                seconds = run_seconds(reply) if final else 0.0
                self.quotas.ended(client_id, app_of(client_id, getattr(job, "app", None)), seconds)
                if seconds:
                    self.fit.ran(seconds)
            self.counters.completed += 1
            timing = (item.enqueued, item.started, time.monotonic())
            self._metrics.job_finished(client_id, job.job_id, runner_for(job), reply, timing)

    def _journal_answer(self, client_id: str, job_id: str, reply: bytes, final: bool) -> None:
        """Store a journaled job's answer (or forget the job, for a retry to run it again)."""
        try:
            if final:
                self._store.finish(client_id, job_id, reply)
            else:
                self._store.forget(client_id, job_id)
        except Exception as exc:
            if not is_storage_full(exc):
                raise
            # Still journaled as accepted: answered now (and again from memory to a re-send),
            # run again after a restart (jobs are safe to re-run).
            self._storage_hit(exc)
            if final:
                self._keep_unjournaled(client_id, job_id, reply)

    def _keep_unjournaled(self, client_id: str, job_id: str, reply: bytes) -> None:
        self._unjournaled[(client_id, job_id)] = reply
        if len(self._unjournaled) > _UNJOURNALED_KEPT:
            del self._unjournaled[next(iter(self._unjournaled))]

    def _storage_hit(self, exc: BaseException) -> None:
        if self._storage is not None:
            self._storage.hit(exc)

    def _held_due(self) -> None:
        """The oldest held journal row is due: written now (with any others due), and the
        timer set again for the next one still held, if any (most are answered first)."""
        self._held_timer = None
        try:
            self._commit()
        finally:
            due = self._store.next_due()
            if due is not None:
                # One due already and still held: the commit failed; try again a little later.
                delay = due - time.monotonic()
                delay = delay if delay > 0 else JOURNAL_DELAY_S
                self._held_timer = self._pool.loop.call_later(delay, self._held_due)

    def flush(self) -> bool:
        """At the end of each turn of the loop: commit the journal's writes of the turn (held
        rows due, answers, quota usage) in one transaction. A failed commit keeps them for the
        next turn. False: the journal was checkpointing; nothing was written (call again)."""
        self.quotas.flush()
        return self._commit()

    def _commit(self) -> bool:
        try:
            return self._store.flush(wait=False)
        except Exception as exc:
            if not is_storage_full(exc):
                raise
            # The disk is full: what the journal could not take is given up rather than held
            # (and its requests acknowledged): the answers go out all the same and are kept in
            # memory for a re-send; a job still running is answered when it ends.
            self._storage_hit(exc)
            for client_id, job_id, reply in self._store.abandon_pending():
                self._keep_unjournaled(client_id, job_id, reply)
            return True

    def _too_large(self, job: Job, size: int) -> bytes:
        """The error that answers a job whose result (of ``size`` bytes) is over the limit."""
        limit = self._limits.max_message_bytes
        message = f"result of {size} bytes over the limit of {limit}"
        return encode(Error(code=ErrorCode.TOO_LARGE, job_id=job.job_id, message=message))

    @staticmethod
    def _with_dropped(reply: bytes, dropped: int) -> bytes:
        """A stream frame's result, with the stream's dropped count as of now."""
        if not dropped:
            return reply
        try:
            decoded = decode_reply(reply)
        except ProtocolError:
            return reply
        if not isinstance(decoded, CallResult):
            return reply
        return encode(msgspec.structs.replace(decoded, dropped=dropped))

    def _check_blob(self, item: QueuedJob, reply: bytes) -> None:
        """A stored blob that no longer matches its hash (disk corruption, tampering) is
        removed, so the next job naming it asks the device to upload it again."""
        try:
            decoded = decode_reply(reply)
        except ProtocolError:
            return
        sha = _blob_of(item.job)
        if sha and isinstance(decoded, Error) and decoded.code is ErrorCode.HASH_MISMATCH:
            log.warning("stored blob %s failed its hash check; removed", sha[:12])
            why = "stored blob failed its hash check; removed"
            self._store.audit(item.reply_to.client_id, "blob", sha, "refused", why)
            self._blobs.discard(sha)

    def _identity_refused(self, topic: str, reply_to: ReplyTo) -> bool:
        """Refuse (and say so) a request from an id that may not send any."""
        client_id = reply_to.client_id
        if client_id == RESERVED_CLIENT_ID:
            # The box owner's identity on the control socket; never a device's.
            self._peer_log.warning(
                "reserved-id", "dropping request from reserved client id %r", client_id
            )
            self.counters.refused += 1
            return True
        if client_id not in self.locked:
            return False
        # A revoked device (pairing.py). The broker's ACLs already stop its own connections;
        # this holds whichever way a request naming it arrives.
        self._store.audit(client_id, "request", topic, "refused", "device revoked")
        if reply_to.topic.startswith(reply_prefix(client_id)):
            self._refuse(reply_to, ErrorCode.FORBIDDEN, "this device's pairing was revoked")
        else:
            self.counters.refused += 1
        return True

    def _refuse(
        self, reply_to: ReplyTo, code: ErrorCode, message: str, job_id: str | None = None
    ) -> None:
        self.counters.refused += 1
        self._metrics.refused(str(code))
        if code is not ErrorCode.STORAGE_FULL:  # said once by the storage guard, not per peer
            self._peer_log.warning(
                str(code), "refused request from %s: %s: %s", reply_to.client_id, code, message
            )
        error = Error(code=code, message=message, job_id=job_id)
        self._publish(reply_to, encode(error))

    def _refuse_quota(
        self, reply_to: ReplyTo, refusal: QuotaRefusal, job_id: str | None = None
    ) -> None:
        """quota_exceeded, saying which quota and when it resets (quota.py)."""
        self.counters.refused += 1
        self._peer_log.warning(
            f"quota-{refusal.quota}",
            "refused request from %s: %s",
            reply_to.client_id,
            refusal.message,
        )
        self._publish(reply_to, encode(refusal.error(job_id)))
