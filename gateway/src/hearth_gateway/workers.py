"""Supervised worker processes, driven by the daemon's loop (loop.py).

Each worker runs one job at a time; the pool hands queued jobs to idle workers as they free up.
A worker that dies mid-job (a crash in a native runtime) or overruns the wall-clock limit (it is
killed) costs that job only: the job is answered with an error and a fresh worker is started.
Workers are started from the loop's thread, which lives as long as the daemon: the kernel's
parent-death signal (set by each worker) fires when the thread that forked it exits.

A worker is recycled, between two jobs and never during one, once it has run
``workers.max_jobs`` jobs or its resident memory is over ``workers.max_rss_bytes`` (policy):
memory a Python heap or a native runtime once grew to is seldom given back, and a fresh process
starts small. The old process gets its EOF and exits in the background while its replacement
starts; queued jobs wait for the next idle worker as usual, so no job fails for it. A worker that
holds an odometry session is kept until the session closes (the session's map lives there).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from hearth.errors import ErrorCode
from hearth.protocol import (
    CallJob,
    Error,
    OnnxJob,
    PipelineJob,
    RunResume,
    RunStart,
    WasmJob,
    encode,
)
from hearth_gateway._frames import FrameReader, write_frame
from hearth_gateway.loop import Loop, Timer
from hearth_gateway.policy import WorkersPolicy
from hearth_gateway.reply_to import ReplyTo
from hearth_gateway.runners import Inspect, Job, RunSignal, TaskEvent, WorkerSettings, WorkItem

__all__ = ["QueuedJob", "WorkerPool"]

log = logging.getLogger(__name__)

_READY_TIMEOUT_S = 60.0  # importing onnxruntime on a small ARM box is slow
_RESPAWN_BACKOFF_S = 1.0  # after a worker fails to start
_MAX_AFFINITIES = 4096  # streams and sessions remembered; the least recently used go first
_EXIT_GRACE_S = 5.0  # a recycled worker still running after this is killed
_REAP_POLL_S = 0.05
_PAGE = os.sysconf("SC_PAGE_SIZE")
# Pipes to and from a worker hold a 1 MiB frame (the unprivileged maximum by default) instead of
# 64 KiB: a camera frame crosses in one write and one wake-up, not sixteen.
_PIPE_BYTES = 1 << 20
# In /proc/PID/stat, counted after the command name: the flags, and the resident pages.
_STAT_FLAGS, _STAT_RSS = 6, 21
_PF_EXITING = 0x4  # the kernel's flag for a process in exit (include/linux/sched.h)
# A worker's memory is read between jobs at most this often: growing by a meaningful amount
# takes a job longer than this, and a read of /proc per job of a millisecond is not free.
_RSS_CHECK_S = 0.05
# A busy worker is handed its next job ahead (written into its pipe behind the running one)
# when every worker is busy, so that it goes from one job to the next without sleeping: a
# process woken for each job runs it with cold caches (a no-op WASM run took 0.07 ms back to
# back, 0.15-0.2 ms after a millisecond's sleep) and pays the wake-up. Only small plain jobs,
# behind jobs of a kind that has been running briefly: one queued behind a long job would wait
# while another worker frees up. Under the default pipe size, the write never blocks.
_AHEAD_MAX_BYTES = 60 * 1024
_AHEAD_MAX_RUN_S = 0.02
_AHEAD_KINDS = (WasmJob, OnnxJob)


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory (RSS), from /proc; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


@dataclass(slots=True)
class QueuedJob:
    reply_to: ReplyTo  # who sent it (admission, journal, worker scope), where its answer goes
    job: Job
    blob_path: str
    snapshot_path: str = ""  # a resumed run's snapshot blob
    snapshot_key: bytes = b""  # the key it is sealed with at rest (b"": not sealed)
    # Jobs with the same affinity run on the same worker (a stream's background model, an
    # odometry session's map live there).
    affinity: str | None = None
    # At most one job per latest-key waits in the queue: a newer one takes its place.
    latest: str | None = None
    session_new: bool = False  # the first frame of a session: the worker may open it
    journaled: bool = True  # stream frames and session control are not (they are ephemeral)
    admitted: bool = True  # holds an admission slot, freed when it completes
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0  # monotonic, when a worker took it (0: not yet); for the metrics


# (job, encoded reply, final): final is False for failures of the gateway's own making
# (a crashed worker) that a retry with the same job id should run again.
ReplySink = Callable[[QueuedJob, bytes, bool], None]
# A reply that does not end its job (a migratable run's checkpoint), and a job a worker took.
ProgressSink = Callable[[QueuedJob, bytes], None]
StartSink = Callable[[QueuedJob], None]


class _Kind(msgspec.Struct):
    """Just a frame's message type: tells a run's checkpoint from its answer."""

    type: str = ""


_kind = msgspec.msgpack.Decoder(_Kind)
_INTERIM = frozenset({"run_checkpoint", "run_round", "run_chunk"})


class _State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


class _Worker:
    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.name = f"worker-{index}"
        self.state = _State.DEAD
        self.proc: subprocess.Popen[bytes] | None = None
        self.job: QueuedJob | None = None
        self.ahead: QueuedJob | None = None  # written behind ``job``, not started yet
        self.deadline: Timer | None = None
        self.info: dict[str, object] = {}
        self.jobs = 0  # run by this process
        self.sessions: set[str] = set()  # odometry sessions whose state lives in this process
        self._reader = FrameReader()
        self._out = -1
        self._in = -1
        self._stat = -1  # its /proc/PID/stat, kept open: read around every job
        self.rss_read_at = 0.0  # when its memory was last read (time.monotonic())

    def spawn(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hearth_gateway.worker", self.pool.settings_json],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            env=self.pool.worker_env,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        for fd in (self._in, self._out):
            with contextlib.suppress(OSError):  # over this system's limit: 64 KiB it is
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        os.set_blocking(self._out, False)
        self._close_stat()
        with contextlib.suppress(OSError):  # no /proc: no RSS limit
            self._stat = os.open(f"/proc/{self.proc.pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        self._reader = FrameReader()
        self.jobs = 0
        self.sessions.clear()
        self.state = _State.STARTING
        self.pool.loop.add_reader(self._out, self._readable)
        self.deadline = self.pool.loop.call_later(_READY_TIMEOUT_S, self._start_timeout)

    def _proc_stat(self) -> list[bytes] | None:
        """The fields of /proc/PID/stat after the command name; None without /proc."""
        if self._stat < 0:
            return None
        try:
            return os.pread(self._stat, 1024, 0).rpartition(b")")[2].split()
        except OSError:
            return None

    def resident(self) -> int | None:
        """This worker's resident memory (RSS) in bytes; None without /proc."""
        fields = self._proc_stat()
        try:
            return None if fields is None else int(fields[_STAT_RSS]) * _PAGE
        except (IndexError, ValueError):
            return None

    def exiting(self) -> bool:
        """Whether the process is dying: killed, it keeps reading its pipe for as long as the
        kernel takes to tear it down (tens of milliseconds for a large one), and a job handed
        to it then would be lost with it."""
        fields = self._proc_stat()
        try:
            return fields is not None and bool(int(fields[_STAT_FLAGS]) & _PF_EXITING)
        except (IndexError, ValueError):
            return False

    def _close_stat(self) -> None:
        if self._stat >= 0:
            os.close(self._stat)
            self._stat = -1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.state != _State.DEAD else None

    def run(self, job: QueuedJob) -> bool:
        """Hand ``job`` to this idle worker. False if the worker turned out to be dead (it
        died while idle and we had not read its EOF yet): the job never started."""
        # The idle worker is blocked reading: the write drains whatever the size.
        if not self._write(self._work(job)):
            return False
        self._begin(job)
        return True

    def run_ahead(self, job: QueuedJob) -> bool:
        """Write ``job`` behind the one this busy worker runs (see _AHEAD_MAX_BYTES); it
        starts when that one's answer comes. False if it is too large to go ahead, or the
        worker turned out to be dead (then the job never started)."""
        work = self._work(job)
        if len(work) > _AHEAD_MAX_BYTES or not self._write(work):
            return False
        self.ahead = job
        return True

    def _work(self, job: QueuedJob) -> bytes:
        return msgspec.msgpack.encode(
            WorkItem(
                job=job.job,
                blob_path=job.blob_path,
                snapshot_path=job.snapshot_path,
                snapshot_key=job.snapshot_key,
                queue_ms=(time.monotonic() - job.enqueued) * 1e3,
                scope=job.reply_to.client_id,
                session_new=job.session_new,
            )
        )

    def _write(self, work: bytes) -> bool:
        assert self.proc is not None
        try:
            # A process in exit (a zombie too) has PF_EXITING; without /proc, ask for a status.
            if self.exiting() or (self._stat < 0 and self.proc.poll() is not None):
                raise BrokenPipeError
            write_frame(self._in, work)
        except OSError:
            self._died()
            return False
        return True

    def _begin(self, job: QueuedJob) -> None:
        self.state = _State.BUSY
        self.job = job
        job.started = time.monotonic()
        self.pool.started(job)
        timeout_s = self.pool.timeout_for(job.job)
        self.deadline = self.pool.loop.call_later(timeout_s, lambda: self._overran(timeout_s))

    def _readable(self) -> None:
        try:
            data = os.read(self._out, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died()
            return
        for frame in self._reader.feed(data):
            self._frame(frame)

    def _frame(self, frame: bytes) -> None:
        job = self.job
        if (
            job is not None
            and isinstance(job.job, RunStart | RunResume)
            and _kind.decode(frame).type in _INTERIM
        ):
            self.pool.progress(job, frame)  # the run goes on: its deadline too
            return
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.state is _State.STARTING:
            self.info = msgspec.msgpack.decode(frame, type=dict[str, object])
            self.state = _State.IDLE
            self.pool.worker_ready(self)
            return
        job, self.job = self.job, None
        self.state = _State.IDLE
        if self.ahead is not None:  # already in the pipe: the worker has started it
            ahead, self.ahead = self.ahead, None
            self._begin(ahead)
        if job is not None:
            self.jobs += 1
            self.pool.finished(self, job, frame, final=True)

    def _overran(self, timeout_s: float) -> None:
        job = self.job
        assert job is not None
        log.warning(
            "%s: job %s over its %.0f s wall-clock limit; killing the worker",
            self.name,
            job.job.job_id,
            timeout_s,
        )
        self.stop(kill=True)
        error = Error(
            code=ErrorCode.TIMEOUT,
            message=f"over the wall-clock limit of {timeout_s} s",
            job_id=job.job.job_id,
        )
        self.pool.finished(self, job, encode(error), final=True)  # it would overrun again
        self.pool.replace(self)

    def _start_timeout(self) -> None:
        log.error("%s: no ready signal within %.0f s", self.name, _READY_TIMEOUT_S)
        self.stop(kill=True)
        self.pool.replace(self, delay_s=_RESPAWN_BACKOFF_S)

    def _died(self) -> None:
        job = self.job
        rc = self.stop(kill=True)
        if job is None:
            log.warning("%s: exited with status %s while idle; replacing it", self.name, rc)
        else:
            log.warning(
                "%s: died (exit status %s) running job %s; replacing it",
                self.name,
                rc,
                job.job.job_id,
            )
            error = Error(
                code=ErrorCode.WORKER_CRASHED,
                message=f"worker process died (exit status {rc})",
                job_id=job.job.job_id,
            )
            # Not necessarily the job's fault (a runtime bug, an operator's kill): a retry with
            # the same job id runs it again rather than replaying this error.
            self.pool.finished(self, job, encode(error), final=False)
        self.pool.replace(self, delay_s=_RESPAWN_BACKOFF_S if job is None else 0.0)

    def signal(self, job: QueuedJob, action: str, received: int = 0) -> bool:
        """Tell the worker about the job it runs (a migratable run's pause or checkpoint)."""
        if self.job is not job or self.state is not _State.BUSY:
            return False
        assert isinstance(job.job, RunStart | RunResume)
        try:
            write_frame(
                self._in,
                msgspec.msgpack.encode(
                    RunSignal(job_id=job.job.job_id, action=action, received=received)
                ),
            )
        except OSError:
            return False  # it died: its death answers the run
        return True

    def retire(self) -> subprocess.Popen[bytes] | None:
        """Detach this idle worker's process and send it its EOF: it closes its runners and
        exits. Returns the process, for the pool to reap without waiting on it here."""
        proc = self.proc
        if self.state is not _State.IDLE or proc is None:
            return None
        self.state = _State.DEAD
        self.pool.loop.remove_reader(self._out)
        self._close_stat()
        assert proc.stdin is not None
        assert proc.stdout is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.stdout.close()  # it writes nothing after its EOF
        return proc

    def stop(self, *, kill: bool = False) -> int | None:
        """Stop the process: EOF on its stdin lets it finish and exit; kill does not wait. A
        job written ahead (never started) goes back to the front of the queue."""
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.job = None
        if self.ahead is not None:
            self.pool.queue.appendleft(self.ahead)
            self.ahead = None
        if self.state is _State.DEAD or self.proc is None:
            return None
        self.state = _State.DEAD
        self.pool.loop.remove_reader(self._out)
        self._close_stat()
        proc = self.proc
        if kill and proc.poll() is None:
            proc.kill()
        assert proc.stdin is not None
        assert proc.stdout is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            rc = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        proc.stdout.close()
        return rc


class WorkerPool:
    """``size`` worker processes sharing one FIFO queue. ``submit`` never blocks: admission
    (policy.py) bounds the queue before jobs get here."""

    def __init__(
        self,
        loop: Loop,
        settings: WorkerSettings,
        size: int,
        sink: ReplySink,
        *,
        wasm_timeout_s: float,
        onnx_timeout_s: float,
        task_timeout_s: float = 10.0,
        vision_timeout_s: float = 30.0,
        run_timeout_s: float = 3600.0,
        recycle: WorkersPolicy | None = None,
        progress: ProgressSink | None = None,
        started: StartSink | None = None,
    ) -> None:
        self.loop = loop
        self.recycle = recycle if recycle is not None else WorkersPolicy()
        self.settings_json = msgspec.json.encode(settings).decode()
        # OpenCV reads its own decoder limit once, when it loads: a second line of defence
        # behind the header check (vision/images.py), so it must be in the environment.
        pixels = int(settings.max_megapixels * 1e6)
        self.worker_env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": str(pixels)}
        self.sink = sink
        self.wasm_timeout_s = wasm_timeout_s
        self.onnx_timeout_s = onnx_timeout_s
        self.task_timeout_s = task_timeout_s
        self.vision_timeout_s = vision_timeout_s
        self.run_timeout_s = run_timeout_s
        self.progress: ProgressSink = progress or (lambda _job, _frame: None)
        self.started: StartSink = started or (lambda _job: None)
        self.queue: deque[QueuedJob] = deque()
        self._affinity: OrderedDict[str, _Worker] = OrderedDict()
        self._latest: dict[str, QueuedJob] = {}
        self._running_latest: set[str] = set()
        self._run_s: dict[type, float] = {}  # recent run time of each kind of job (seconds)
        self.restarts = 0  # workers replaced after a crash, an overrun or a failed start
        self.recycled = 0  # workers replaced for their memory or job count (between jobs)
        self._exiting: list[tuple[subprocess.Popen[bytes], float]] = []  # recycled, not reaped
        self._warned_limit = False
        self.info: dict[str, object] = {}
        self._workers = [_Worker(self, i) for i in range(size)]
        self._closed = False

    def start(self, timeout_s: float = _READY_TIMEOUT_S) -> dict[str, object]:
        """Start every worker and wait (running the loop) until all are ready; returns what
        they report about themselves (e.g. the execution providers)."""
        for worker in self._workers:
            worker.spawn()
        ready = self.loop.run_until(
            lambda: all(w.state is _State.IDLE for w in self._workers), timeout_s
        )
        if not ready:
            raise RuntimeError("worker processes did not start; see the log above")
        return self.info

    def timeout_for(self, job: Job) -> float:
        """The wall-clock limit (s) for one job of this kind, from the policy."""
        if isinstance(job, OnnxJob):
            return self.onnx_timeout_s
        if isinstance(job, TaskEvent):
            return self.task_timeout_s
        if isinstance(job, CallJob | PipelineJob):
            return self.vision_timeout_s
        if isinstance(job, RunStart | RunResume):
            return self.run_timeout_s
        if isinstance(job, Inspect) and job.runner == "onnx":  # a describe loads the model
            return self.onnx_timeout_s
        return self.wasm_timeout_s

    def steer(self, job: QueuedJob, action: str, received: int = 0) -> bool:
        """Signal the worker running ``job`` (a migratable run); False if none runs it."""
        return any(worker.signal(job, action, received) for worker in self._workers)

    @property
    def size(self) -> int:
        return len(self._workers)

    @property
    def busy(self) -> int:
        return sum(1 for w in self._workers if w.state is _State.BUSY)

    @property
    def pending(self) -> int:
        """Jobs not started: in the queue, or written ahead to a busy worker."""
        return len(self.queue) + sum(1 for w in self._workers if w.ahead is not None)

    @property
    def idle(self) -> bool:
        return not self.queue and self.busy == 0

    def pids(self) -> list[int]:
        return [pid for w in self._workers if (pid := w.pid) is not None]

    def resident(self) -> list[int]:
        """Each live worker's resident memory in bytes (empty without /proc)."""
        return [rss for pid in self.pids() if (rss := resident_bytes(pid)) is not None]

    def submit(self, job: QueuedJob) -> None:
        if job.latest is not None:
            self._latest[job.latest] = job
        self.queue.append(job)
        self._dispatch()

    def waiting(self, latest: str) -> QueuedJob | None:
        """The job with this latest-key still waiting in the queue, if any."""
        return self._latest.get(latest)

    def supersede(self, job: QueuedJob) -> QueuedJob:
        """Put ``job`` in the queue slot of the waiting job with its latest-key (latest frame
        wins: the queue stays bounded however fast a camera publishes); returns the one it
        replaced, which will not run."""
        assert job.latest is not None
        old = self._latest[job.latest]
        for index, queued in enumerate(self.queue):
            if queued is old:
                self.queue[index] = job
                break
        self._latest[job.latest] = job
        return old

    def forget_affinity(self, key: str) -> None:
        worker = self._affinity.pop(key, None)
        if worker is not None:
            worker.sessions.discard(key)

    def _worker_for(self, job: QueuedJob) -> _Worker | None:
        if job.affinity is None:
            return None
        worker = self._affinity.get(job.affinity)
        if worker is not None:
            self._affinity.move_to_end(job.affinity)
        return worker

    def _next_for(self, worker: _Worker) -> QueuedJob | None:
        """The first queued job this worker may take: FIFO, except that a job bound to another
        worker waits for that one (later jobs may pass it), jobs bound to this worker go
        first (nobody else can run them), and a stream runs one frame at a time."""
        chosen = None
        for index, job in enumerate(self.queue):
            if job.latest is not None and job.latest in self._running_latest:
                # One frame of a stream at a time: the next one waits (and is replaced by newer
                # ones), so a frame's latency stays within two run times and runs are not
                # slowed by the same camera's other frames competing for the cores.
                continue
            bound = self._worker_for(job)
            if bound is worker:
                chosen = index
                break
            if bound is None and chosen is None:
                chosen = index
        if chosen is None:
            return None
        job = self.queue[chosen]
        del self.queue[chosen]
        return job

    def _dispatch(self) -> None:
        for worker in self._workers:
            if not self.queue:
                return
            if worker.state is not _State.IDLE:
                continue
            job = self._next_for(worker)
            if job is None:
                continue
            if not worker.run(job):
                self.queue.appendleft(job)  # never started: first in line again
                continue
            if job.latest is not None:
                self._running_latest.add(job.latest)
                if self._latest.get(job.latest) is job:
                    del self._latest[job.latest]
            if job.affinity is not None and job.affinity not in self._affinity:
                self._affinity[job.affinity] = worker
                if isinstance(job.job, CallJob) and job.job.session:
                    worker.sessions.add(job.affinity)
                while len(self._affinity) > _MAX_AFFINITIES:
                    key, held_by = self._affinity.popitem(last=False)
                    held_by.sessions.discard(key)
        if self.queue:  # every worker is busy
            self._dispatch_ahead()

    def _dispatch_ahead(self) -> None:
        """Jobs written ahead to busy workers (see _AHEAD_MAX_BYTES)."""
        for worker in self._workers:
            if not self.queue:
                return
            running = worker.job
            if (
                worker.state is not _State.BUSY
                or worker.ahead is not None
                or running is None
                or not self._brief(running)
                or self._recycling_next(worker)
            ):
                continue
            job = self.queue[0]
            if not isinstance(job.job, _AHEAD_KINDS) or job.affinity or job.latest:
                return  # the first in line waits for a free worker; FIFO holds
            self.queue.popleft()
            if not worker.run_ahead(job):
                self.queue.appendleft(job)

    def _recycling_next(self, worker: _Worker) -> bool:
        """Whether ``worker`` is to be recycled once its running job ends (nothing goes ahead:
        it must be idle then)."""
        max_jobs = self.recycle.max_jobs
        if max_jobs and worker.jobs + 1 >= max_jobs:
            return True
        return self._recycle_reason(worker) is not None

    def _brief(self, job: QueuedJob) -> bool:
        """Whether ``job`` is of a kind whose recent runs were short (a job may go ahead
        behind it)."""
        if not isinstance(job.job, _AHEAD_KINDS) or job.affinity or job.latest:
            return False
        recent = self._run_s.get(type(job.job))
        return recent is not None and recent < _AHEAD_MAX_RUN_S

    # -- called by workers ---------------------------------------------------------------------

    def worker_ready(self, worker: _Worker) -> None:
        if not self.info:
            self.info = dict(worker.info)
        self._dispatch()

    def finished(self, worker: _Worker, job: QueuedJob, reply: bytes, *, final: bool) -> None:
        if job.latest is not None:
            self._running_latest.discard(job.latest)
        if job.started:  # a moving average of each kind's run time, for _brief
            kind = type(job.job)
            ran = time.monotonic() - job.started
            self._run_s[kind] = 0.8 * self._run_s.get(kind, ran) + 0.2 * ran
        self.sink(job, reply, final)
        if worker.state is _State.IDLE:  # between jobs: the one moment it may be recycled
            self._maybe_recycle(worker)
        self._dispatch()

    def _recycle_reason(self, worker: _Worker) -> str | None:
        if worker.sessions:
            return None  # a session's state lives there: wait until it closes
        policy = self.recycle
        if policy.max_jobs and worker.jobs >= policy.max_jobs:
            return f"it ran {worker.jobs} jobs"
        if policy.max_rss_bytes and worker.proc is not None:
            now = time.monotonic()
            if now - worker.rss_read_at < _RSS_CHECK_S:
                return None
            worker.rss_read_at = now
            rss = worker.resident()
            if rss is None or rss <= policy.max_rss_bytes:
                return None
            if worker.jobs == 1 and not self._warned_limit:
                self._warned_limit = True
                log.warning(
                    "%s is over workers.max_rss_bytes after a single job (%.0f MiB): workers "
                    "running such jobs restart after each one; raise the limit if that is "
                    "not meant",
                    worker.name,
                    rss / 2**20,
                )
            return f"{rss / 2**20:.0f} MiB resident, over {policy.max_rss_bytes / 2**20:.0f}"
        return None

    def _maybe_recycle(self, worker: _Worker) -> None:
        reason = self._recycle_reason(worker)
        if reason is None or self._closed:
            return
        proc = worker.retire()
        if proc is None:
            return
        log.info("%s: recycling pid %d (%s)", worker.name, proc.pid, reason)
        self.recycled += 1
        self._exiting.append((proc, time.monotonic() + _EXIT_GRACE_S))
        if len(self._exiting) == 1:
            self.loop.call_later(_REAP_POLL_S, self._reap)
        try:
            worker.spawn()
        except OSError:
            log.exception("%s: could not start a worker process", worker.name)
            self.replace(worker, delay_s=_RESPAWN_BACKOFF_S)

    def _reap(self) -> None:
        """Collect recycled processes as they exit (killed past their grace period)."""
        now = time.monotonic()
        still: list[tuple[subprocess.Popen[bytes], float]] = []
        for proc, deadline in self._exiting:
            if proc.poll() is not None:
                continue
            if now < deadline:
                still.append((proc, deadline))
                continue
            log.warning("recycled worker pid %d did not exit; killing it", proc.pid)
            proc.kill()
            proc.wait()
        self._exiting = still
        if still and not self._closed:
            self.loop.call_later(_REAP_POLL_S, self._reap)

    def replace(self, worker: _Worker, delay_s: float = 0.0) -> None:
        if self._closed:
            return
        self.restarts += 1

        def respawn() -> None:
            if self._closed:
                return
            try:
                worker.spawn()
            except OSError:
                log.exception("%s: could not start a worker process", worker.name)
                self.loop.call_later(_RESPAWN_BACKOFF_S, respawn)

        if delay_s:
            self.loop.call_later(delay_s, respawn)
        else:
            respawn()

    def close(self) -> None:
        """Stop every worker now (drain first with ``loop.run_until(lambda: pool.idle)``).
        Jobs still queued stay in the journal and run on the next start. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.stop(kill=worker.state is _State.BUSY)
        for proc, _deadline in self._exiting:
            try:
                proc.wait(timeout=_EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._exiting.clear()
