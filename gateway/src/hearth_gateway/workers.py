"""Supervised worker processes. Concurrency model of the daemon: threads, each named and owned.

Each ``_Lane`` thread owns one worker process and feeds it one job at a time from the shared
queue, so a slow job holds one lane and never the MQTT loop. A worker that dies (crash) or
overruns the wall-clock limit (killed) costs that job only: it is answered with an error and the
lane starts a fresh worker before taking the next job.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from hearth.errors import ErrorCode
from hearth.protocol import Error, OnnxJob, encode
from hearth_gateway._frames import FrameTimeout, read_frame, write_frame
from hearth_gateway.runners import Job, WorkerSettings, WorkItem

__all__ = ["QueuedJob", "WorkerPool"]

log = logging.getLogger(__name__)

_READY_TIMEOUT_S = 60.0  # importing onnxruntime on a small ARM box is slow


@dataclass(slots=True)
class QueuedJob:
    client_id: str
    job: Job
    blob_path: str
    response_topic: str
    correlation: bytes
    qos: int = 1
    enqueued: float = field(default_factory=time.monotonic)


# (job, encoded reply, final): final is False for failures of the gateway's own making
# (a crashed worker, an internal error) that a retry with the same job id should run again.
ReplySink = Callable[[QueuedJob, bytes, bool], None]


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, settings_json: str, name: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hearth_gateway.worker", settings_json],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        hello = msgspec.msgpack.decode(
            read_frame(self._out, time.monotonic() + _READY_TIMEOUT_S), type=dict[str, object]
        )
        self.info = hello
        log.debug("%s: worker pid %d ready", name, self.proc.pid)

    def call(self, payload: bytes, timeout_s: float) -> bytes:
        write_frame(self._in, payload)
        return read_frame(self._out, time.monotonic() + timeout_s)

    def close(self, *, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # EOF: the worker finishes and exits
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class _Lane(threading.Thread):
    def __init__(self, pool: WorkerPool, index: int) -> None:
        super().__init__(name=f"hearth-lane-{index}", daemon=True)
        self._pool = pool
        self.worker: _Worker | None = None
        self.busy = False
        self.ready = threading.Event()
        self.start_error: BaseException | None = None

    def start_worker(self) -> None:
        self.worker = _Worker(self._pool.settings_json, self.name)

    def run(self) -> None:
        # The worker is started from this thread, which lives as long as the lane: the
        # kernel's parent-death signal fires when the *thread* that forked it exits.
        try:
            self.start_worker()
        except Exception as exc:  # noqa: BLE001 - reported to start(), which raises it
            self.start_error = exc
            return
        finally:
            self.ready.set()
        pool = self._pool
        while True:
            item = pool.queue.get()
            if item is None:
                break
            self.busy = True
            final = True
            try:
                reply, final = self._execute(item)
            except Exception:  # a bug in the daemon must not take the lane down with it
                log.exception("%s: unexpected error running job %s", self.name, item.job.job_id)
                reply = encode(
                    Error(
                        code=ErrorCode.INTERNAL,
                        message="internal error",
                        job_id=item.job.job_id,
                    )
                )
                final = False
            finally:
                self.busy = False
            pool.sink(item, reply, final)
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def _execute(self, item: QueuedJob) -> tuple[bytes, bool]:
        pool = self._pool
        queue_ms = (time.monotonic() - item.enqueued) * 1e3
        work = msgspec.msgpack.encode(
            WorkItem(job=item.job, blob_path=item.blob_path, queue_ms=queue_ms)
        )
        timeout_s = pool.onnx_timeout_s if isinstance(item.job, OnnxJob) else pool.wasm_timeout_s
        if self.worker is not None and self.worker.proc.poll() is not None:
            # Died while idle (the OOM killer, an operator's kill): replace it before use.
            log.warning(
                "%s: idle worker exited with %s; replacing it",
                self.name,
                self.worker.proc.returncode,
            )
            self.worker.close(kill=True)
            self.worker = None
            pool.restarts += 1
        if self.worker is None:
            self.start_worker()
        assert self.worker is not None
        try:
            return self.worker.call(work, timeout_s), True
        except FrameTimeout:
            log.warning(
                "%s: job %s over %.0f s wall clock; killing its worker",
                self.name,
                item.job.job_id,
                timeout_s,
            )
            code, message = ErrorCode.TIMEOUT, f"over the wall-clock limit of {timeout_s} s"
            final = True  # it would overrun again
            self.worker.close(kill=True)
        except (EOFError, BrokenPipeError):
            rc = self.worker.proc.poll()
            log.warning(
                "%s: worker died (exit %s) running job %s; replacing it",
                self.name,
                rc,
                item.job.job_id,
            )
            code, message = ErrorCode.WORKER_CRASHED, f"worker process died (exit status {rc})"
            final = False  # may be a bug or a kill from outside: let a retry run it again
            self.worker.close(kill=True)
        pool.restarts += 1
        self.worker = None
        if not pool.closing:
            self.start_worker()  # ready before the next job arrives
        return encode(Error(code=code, message=message, job_id=item.job.job_id)), final


class WorkerPool:
    """``size`` lanes sharing one queue. ``submit`` never blocks: admission (policy.py) bounds
    the queue before jobs get here."""

    def __init__(
        self,
        settings: WorkerSettings,
        size: int,
        sink: ReplySink,
        *,
        wasm_timeout_s: float,
        onnx_timeout_s: float,
    ) -> None:
        self.settings_json = msgspec.json.encode(settings).decode()
        self.sink = sink
        self.wasm_timeout_s = wasm_timeout_s
        self.onnx_timeout_s = onnx_timeout_s
        self.queue: queue.SimpleQueue[QueuedJob | None] = queue.SimpleQueue()
        self.restarts = 0
        self.closing = False
        self._lanes = [_Lane(self, i) for i in range(size)]
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> dict[str, object]:
        """Start every worker (in parallel) and the lanes; returns what the workers reported
        about themselves (e.g. the execution providers)."""
        for lane in self._lanes:
            lane.start()
        for lane in self._lanes:
            lane.ready.wait()
            if lane.start_error is not None:
                raise RuntimeError(f"worker process failed to start: {lane.start_error}")
        worker = self._lanes[0].worker
        return dict(worker.info) if worker is not None else {}

    @property
    def size(self) -> int:
        return len(self._lanes)

    @property
    def busy(self) -> int:
        return sum(1 for lane in self._lanes if lane.busy)

    def pids(self) -> list[int]:
        return [lane.worker.proc.pid for lane in self._lanes if lane.worker is not None]

    def submit(self, job: QueuedJob) -> None:
        self.queue.put(job)

    def close(self, timeout_s: float = 20.0) -> None:
        """Let queued jobs finish (up to ``timeout_s``), then stop the workers. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.closing = True
        for _ in self._lanes:
            self.queue.put(None)
        deadline = time.monotonic() + timeout_s
        for lane in self._lanes:
            if lane.is_alive():
                lane.join(max(0.0, deadline - time.monotonic()))
        for lane in self._lanes:
            if lane.worker is not None:
                lane.worker.close(kill=True)
        if any(lane.is_alive() for lane in self._lanes):
            log.warning(
                "worker lanes still busy after %.0f s; their workers were killed", timeout_s
            )
