"""The migratable-run runner: run_start and run_resume (docs/migration.md), in a worker.

A run occupies its worker until it finishes or is paused. The daemon steers it with
``RunSignal`` frames on the worker's stdin, which a listener thread of this runner reads while
the run executes on the main thread (between runs the worker's own loop reads them), and hands
to :meth:`MigrateRunner.control`: ``pause`` stops it at its next migration point (its
start is answered ``run_moved`` with the snapshot), ``checkpoint`` takes a checkpoint there.
A run with at least ``precopy_over_mib`` of memory is pre-copied when asked to stop: a thread
of this runner sends its memory in rounds (``run_round`` frames) while it goes on, then it
stops and its ``run_moved`` carries a delta against those rounds (docs/migration.md §8.4).
A signal names the run's job id, so one meant for a run that has just ended cannot stop the
next. Checkpoints are written as frames of their own (``run_checkpoint``) before the final
reply; the daemon forwards them to the device.
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec

from hearth.errors import ErrorCode, JobError
from hearth.protocol import (
    Reply,
    RunCheckpoint,
    RunMoved,
    RunResult,
    RunResume,
    RunRound,
    RunStart,
    encode,
)
from hearth.runtime.migratable import MigratableRuntime, Paused, Run
from hearth.runtime.snapshot import (
    MemoryRound,
    Snapshot,
    decode_snapshot,
    encode_round,
    encode_snapshot,
)
from hearth.runtime.wasm import WasmRuntime
from hearth_gateway._frames import read_frame
from hearth_gateway.runners import RunSignal, ToWorker, WorkerSettings, WorkItem
from hearth_gateway.sealed_file import is_sealed, open_sealed

__all__ = ["MigrateRunner"]

log = logging.getLogger(__name__)

# How often the signal listener looks at its stop flag: the delay a run's answer can take.
_LISTEN_POLL_S = 0.02


class MigrateRunner:
    def __init__(self, settings: WorkerSettings) -> None:
        self._limits = settings.wasm_limits
        self._gateway = settings.gateway_id or "edge"
        self._checkpoint_every_s = settings.checkpoint_every_s
        self._checkpoint_every_mib = settings.checkpoint_every_mib
        self._precopy_over = int(settings.precopy_over_mib * 2**20)
        self._precopy: threading.Thread | None = None  # sending rounds of the run now
        self._emit_lock = threading.Lock()  # checkpoints and rounds come from two threads
        self._wasm = WasmRuntime(cache_dir=Path(settings.cache_dir) / "wasm", wasi_nn=None)
        self._runtime = MigratableRuntime(self._wasm)
        self._lock = threading.Lock()
        self._active: tuple[str, Run] | None = None  # (job id, run)
        # Signals that came before their run started (the daemon sends them right after the
        # work item): applied when it does. Cleared when a run ends: the daemon hands a worker
        # its next item only then, so nothing left here can belong to a later run.
        self._early: dict[str, str] = {}
        # Set by the worker: writes one frame (an interim reply) to the daemon; and the fd the
        # daemon's signals arrive on (-1: none are read while a run executes).
        self.emit: Callable[[bytes], None] = lambda _frame: None
        self.control_fd = -1

    def control(self, job_id: str, action: str) -> None:
        """Steer the run of ``job_id`` (called from the worker's reader thread)."""
        with self._lock:
            active = self._active
            if active is None or active[0] != job_id:
                self._early[job_id] = action
                return
        self._apply(active[0], active[1], action)

    def _apply(self, job_id: str, run: Run, action: str) -> None:
        if action != "pause":
            run.checkpoint()
        elif self._precopy_over:
            with self._lock:
                if self._precopy is not None:
                    return  # already leaving
                self._precopy = threading.Thread(
                    target=self._send_rounds, args=(job_id, run), name="run-precopy"
                )
            self._precopy.start()
        else:
            run.pause()

    def _send_rounds(self, job_id: str, run: Run) -> None:
        """Pre-copy: rounds to the daemon (and so to the device) while the run goes on, then
        the pause against them (Run.precopy's policy)."""

        def send(memory_round: MemoryRound) -> None:
            data = encode_round(memory_round)
            self._emit(encode(RunRound(job_id=job_id, run_id=run.run_id, round=data)))

        try:
            size = run.memory_size()  # 0: no migration point came to tell
            log.info("run %s leaving with %d bytes of memory", run.run_id, size)
            if 0 < size < self._precopy_over:
                run.pause()  # small enough to stop and copy at once
            else:
                run.precopy(send)
        except JobError as exc:  # it ended or stopped meanwhile: a plain pause does for the rest
            log.info("run %s: pre-copy ended early (%s)", run.run_id, exc)
            run.pause()

    def _emit(self, frame: bytes) -> None:
        with self._emit_lock:
            self.emit(frame)

    def run(self, item: WorkItem) -> Reply:
        job = item.job
        assert isinstance(job, RunStart | RunResume)
        module_path = Path(item.blob_path)
        if isinstance(job, RunStart):
            run = self._runtime.start(
                job.module,
                args=job.args,
                stdin=job.stdin,
                limits=self._limits,
                run_id=job.run_id,
                data_class=job.data_class,
                where=self._gateway,
                path=module_path,
            )
        else:
            snapshot_path = Path(item.snapshot_path)
            stored = snapshot_path.read_bytes()
            if is_sealed(stored):  # as every snapshot the daemon stored (blobs.py)
                stored = open_sealed(snapshot_path, item.snapshot_key)
            snapshot = decode_snapshot(stored, sha256=job.snapshot, module=job.module)
            if snapshot.run_id != job.run_id:
                raise JobError(ErrorCode.SNAPSHOT_MISMATCH, "snapshot of another run")
            run = self._runtime.resume(
                snapshot, limits=self._limits, where=self._gateway, path=module_path
            )
        run.checkpoint_every_s = job.checkpoint_every_s or self._checkpoint_every_s or None
        every_mib = job.checkpoint_every_mib or self._checkpoint_every_mib
        run.checkpoint_every_bytes = int(every_mib * 2**20) or None
        run.on_checkpoint = lambda snap: self._checkpointed(job, snap)
        with self._lock:
            self._active = (job.job_id, run)
            early = self._early.pop(job.job_id, None)
        if early is not None:
            self._apply(job.job_id, run, early)
        stop = threading.Event()
        listener = threading.Thread(target=self._listen, args=(stop,), name="run-signals")
        if self.control_fd >= 0:
            listener.start()
        try:
            outcome = run.execute()
        finally:
            # The listener stops before the answer goes out: after it, the daemon may write
            # the next job, which is the worker loop's to read.
            stop.set()
            if listener.is_alive():
                listener.join()
            with self._lock:
                self._active = None
                self._early.clear()
                precopy, self._precopy = self._precopy, None
            if precopy is not None:
                precopy.join()  # its rounds go out before the answer
        if isinstance(outcome, Paused):
            data = encode_snapshot(outcome.snapshot)
            return RunMoved(
                job_id=job.job_id,
                run_id=job.run_id,
                snapshot=data,
                reason="",
                paused_at=run.paused_at or 0.0,
            )
        return RunResult(
            job_id=job.job_id,
            run_id=job.run_id,
            exit_code=outcome.exit_code,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            hops=run.snapshot.hops,
            fuel_used=outcome.fuel_used,
        )

    def _checkpointed(self, job: RunStart | RunResume, snapshot: Snapshot) -> None:
        data = encode_snapshot(snapshot)
        message = RunCheckpoint(
            job_id=job.job_id, run_id=job.run_id, seq=snapshot.seq, snapshot=data
        )
        self._emit(encode(message))

    def _listen(self, stop: threading.Event) -> None:
        """Read the daemon's signals while a run executes (the daemon writes nothing else to a
        busy worker, and each signal is one small frame written at once)."""
        decoder = msgspec.msgpack.Decoder(ToWorker)
        while not stop.is_set():
            ready, _, _ = select.select([self.control_fd], [], [], _LISTEN_POLL_S)
            if not ready:
                continue
            try:
                message = decoder.decode(read_frame(self.control_fd))
            except EOFError:
                return  # the daemon closed our stdin: the worker loop sees it next
            if isinstance(message, RunSignal):
                self.control(message.job_id, message.action)

    def describe(self) -> dict[str, list[str]]:
        return {}

    def close(self) -> None:
        self._wasm.close()
