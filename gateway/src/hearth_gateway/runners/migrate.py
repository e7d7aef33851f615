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
reply; the daemon forwards them to the device. For a device that acknowledges them
(``window_bytes``), rounds, checkpoints and the pieces of large snapshots are flow-controlled
(``_flow.SendWindow``): this runner cuts what is larger than ``max_chunk_bytes`` into
``run_chunk`` pieces itself, and sends each only while it fits in the device's window.
"""

from __future__ import annotations

import hashlib
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
    RunChunk,
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
from hearth_gateway.runners._flow import SendWindow
from hearth_gateway.sealed_file import is_sealed, open_sealed

__all__ = ["MigrateRunner"]

log = logging.getLogger(__name__)

# How often the signal listener looks at its stop flag: the delay a run's answer can take.
_LISTEN_POLL_S = 0.02
# zlib level of pre-copy rounds and of the delta that ends them: memory a run keeps rewriting
# is seldom compressible (zero chunks are left out anyway), and on a LAN compressing it costs
# more time than it saves, downtime included.
_PRECOPY_LEVEL = 0
_PRECOPY_MAX_ROUNDS = 30
_FREE_AFTER_S = 0.5  # after a run's answer, before its memory is freed


class MigrateRunner:
    def __init__(self, settings: WorkerSettings) -> None:
        self._limits = settings.wasm_limits
        self._gateway = settings.gateway_id or "edge"
        self._checkpoint_every_s = settings.checkpoint_every_s
        self._checkpoint_every_mib = settings.checkpoint_every_mib
        self._precopy_over = int(settings.precopy_over_mib * 2**20)
        self._piece_bytes = max(1, settings.max_chunk_bytes)
        self._window = SendWindow(0)  # the current hop's (run_start window_bytes)
        # Frees the memory of the run that last left, shortly after its answer is out
        # (Run.keep_on_pause): not while the answer is on its way (downtime).
        self._freeing: threading.Timer | None = None
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
        if action == "received":
            return  # an acknowledgement that came after its run ended
        with self._lock:
            active = self._active
            if active is None or active[0] != job_id:
                self._early[job_id] = action
                return
        self._apply(active[0], active[1], action)

    def control_received(self, job_id: str, received: int) -> None:
        """The device's acknowledgement (flow control), from the reader thread."""
        with self._lock:
            active = self._active
        if active is not None and active[0] == job_id:
            self._window.ack(received)

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
            data = encode_round(memory_round, level=_PRECOPY_LEVEL)

            def message(inline: bytes, sha: str) -> bytes:
                return encode(
                    RunRound(job_id=job_id, run_id=run.run_id, round=inline, round_sha256=sha)
                )

            self._send(job_id, run.run_id, data, message)
            # The next round is measured once this one is applied (Run.precopy expects it):
            # what the run dirties meanwhile is what the link could not yet carry.
            self._window.drain()

        # It is leaving: a periodic checkpoint now would only hold the run up and compete
        # with the rounds for the link (one asked for by the device still comes).
        run.checkpoint_every_s = run.checkpoint_every_bytes = None
        try:
            # 0: no migration point came to tell (the run is busy, or blocked sending a
            # checkpoint): rounds read before one comes would read a stale, smaller memory.
            size = run.memory_size()
            while size == 0 and not self._window.closed:
                size = run.memory_size()
            log.info("run %s leaving with %d bytes of memory", run.run_id, size)
            if 0 < size < self._precopy_over:
                run.pause()  # small enough to stop and copy at once
            else:
                # MQTT through the daemon and a broker carries memory slower than many runs
                # dirty it: rounds without progress slow the run down (auto-converge) rather
                # than end in a large delta, which is downtime.
                sizes = run.precopy(send, throttle=True, max_rounds=_PRECOPY_MAX_ROUNDS)
                log.info("run %s: %d pre-copy rounds, %d bytes", run.run_id, len(sizes), sum(sizes))
        except JobError as exc:  # it ended or stopped meanwhile: a plain pause does for the rest
            log.info("run %s: pre-copy ended early (%s)", run.run_id, exc)
            run.pause()

    def _emit(self, frame: bytes) -> None:
        with self._emit_lock:
            self.emit(frame)

    def _send(
        self, job_id: str, run_id: str, data: bytes, message: Callable[[bytes, str], bytes]
    ) -> None:
        """An interim message carrying ``data`` (a round, a checkpoint's snapshot): inline,
        or, to a device with a window and when larger than a piece, as run_chunk pieces then
        the message naming it by its sha256; each waits for room in the window. Without a
        window the daemon cuts what is larger than a message (runs.in_pieces)."""
        window = self._window
        with self._emit_lock:  # a message and its pieces go out together, in order
            if window.on and len(data) > self._piece_bytes:
                self._pieces(window, job_id, run_id, data)
                window.wait_room(0)
                window.sent(0)
                self.emit(message(b"", hashlib.sha256(data).hexdigest()))
                return
            window.wait_room(len(data))
            window.sent(len(data))
            self.emit(message(data, ""))

    def _pieces(self, window: SendWindow, job_id: str, run_id: str, data: bytes) -> None:
        sha = hashlib.sha256(data).hexdigest()
        step = self._piece_bytes
        for offset in range(0, len(data), step):
            piece = data[offset : offset + step]
            window.wait_room(len(piece))
            window.sent(len(piece))
            self.emit(
                encode(
                    RunChunk(
                        job_id=job_id,
                        run_id=run_id,
                        sha256=sha,
                        size=len(data),
                        offset=offset,
                        data=piece,
                    )
                )
            )

    def run(self, item: WorkItem) -> Reply:
        job = item.job
        assert isinstance(job, RunStart | RunResume)
        self._free_left()
        run = self._make_run(item, job)
        run.keep_on_pause = True
        run.checkpoint_every_s = job.checkpoint_every_s or self._checkpoint_every_s or None
        every_mib = job.checkpoint_every_mib or self._checkpoint_every_mib
        run.checkpoint_every_bytes = int(every_mib * 2**20) or None
        run.on_checkpoint = lambda snap: self._checkpointed(job, snap)
        self._window = SendWindow(job.window_bytes)
        with self._lock:
            self._active = (job.job_id, run)
            early = self._early.pop(job.job_id, None)
        if early is not None:
            self._apply(job.job_id, run, early)
        stop = threading.Event()
        listener = threading.Thread(target=self._listen, args=(stop,), name="run-signals")
        if self.control_fd >= 0:
            listener.start()
        moved: RunMoved | None = None
        try:
            outcome = run.execute()
            if isinstance(outcome, Paused):
                # Pre-copy paused it as its last act; the snapshot's pieces go out while the
                # listener still takes the device's acknowledgements.
                with self._lock:
                    precopy = self._precopy
                if precopy is not None:
                    precopy.join()
                moved = self._moved(job, run, outcome.snapshot)
                self._freeing = threading.Timer(_FREE_AFTER_S, run.close)
                self._freeing.name = "run-free"
                self._freeing.start()
        finally:
            if moved is None:
                run.close()  # an instance a pause kept, if it ended otherwise after all
            self._window.close()  # nothing waits for acknowledgements from here on
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
        if moved is not None:
            return moved
        assert not isinstance(outcome, Paused)
        return RunResult(
            job_id=job.job_id,
            run_id=job.run_id,
            exit_code=outcome.exit_code,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            hops=run.snapshot.hops,
            fuel_used=outcome.fuel_used,
        )

    def _make_run(self, item: WorkItem, job: RunStart | RunResume) -> Run:
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
        return run

    def _moved(self, job: RunStart | RunResume, run: Run, snapshot: Snapshot) -> RunMoved:
        """The hop's answer when the run stopped: its snapshot inline, or (larger than a
        piece, to a device with a window) sent ahead in flow-controlled run_chunk pieces and
        named by its sha256."""
        if snapshot.precopy_rounds > 0:  # a delta, stored like the rounds
            data = encode_snapshot(snapshot, level=_PRECOPY_LEVEL)
        else:
            data = encode_snapshot(snapshot)
        sha = ""
        window = self._window
        if window.on and len(data) > self._piece_bytes:
            try:
                with self._emit_lock:
                    self._pieces(window, job.job_id, job.run_id, data)
                data, sha = b"", hashlib.sha256(data).hexdigest()
            except JobError:  # the device stopped acknowledging: whole, as without a window
                pass
        return RunMoved(
            job_id=job.job_id,
            run_id=job.run_id,
            snapshot=data,
            snapshot_sha256=sha,
            reason="",
            paused_at=run.paused_at or 0.0,
        )

    def _checkpointed(self, job: RunStart | RunResume, snapshot: Snapshot) -> None:
        data = encode_snapshot(snapshot)

        def message(inline: bytes, sha: str) -> bytes:
            return encode(
                RunCheckpoint(
                    job_id=job.job_id,
                    run_id=job.run_id,
                    seq=snapshot.seq,
                    snapshot=inline,
                    snapshot_sha256=sha,
                )
            )

        try:
            self._send(job.job_id, job.run_id, data, message)
        except JobError as exc:  # the device stopped acknowledging: the run goes on
            log.info("run %s: checkpoint %d not sent whole (%s)", job.run_id, snapshot.seq, exc)

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
            if isinstance(message, RunSignal) and message.action == "received":
                self.control_received(message.job_id, message.received)
            elif isinstance(message, RunSignal):
                self.control(message.job_id, message.action)

    def _free_left(self) -> None:
        """Free the memory of the run that left last, now if not yet (idempotent)."""
        freeing, self._freeing = self._freeing, None
        if freeing is not None:
            freeing.cancel()
            freeing.join()
            freeing.function()  # Run.close is idempotent

    def describe(self) -> dict[str, list[str]]:
        return {}

    def close(self) -> None:
        self._free_left()
        self._wasm.close()
