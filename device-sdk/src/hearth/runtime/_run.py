"""One migratable run: executing it, stopping it at a migration point, capturing its state
and putting it back (docs/migration.md §3.1). hearth.runtime.migratable makes runs and gives
them instances; this module is what a run does with one.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from hearth.errors import ErrorCode, JobError
from hearth.runtime import _chunks, _hostcall
from hearth.runtime.asyncify import GLOBAL_EXPORT_PREFIX
from hearth.runtime.limits import WasmLimits
from hearth.runtime.snapshot import GlobalValue, MemoryRound, Snapshot
from hearth.runtime.wasi_host import Exit, GuestFault, OutputLimit, WasiHost, WasiState

try:
    import wasmtime
except ImportError:  # pragma: no cover - exercised only without the `local` extra
    wasmtime = None  # type: ignore[assignment]

__all__ = [
    "Finished",
    "Instance",
    "MemoryImage",
    "Paused",
    "Run",
    "copy_state",
    "current",
    "host_failed",
    "instantiation_error",
    "memory_image",
]

_PAGE = 65536
# The Asyncify buffer: where the unwound stack (each frame's live locals) is kept. 64 KiB
# holds hundreds of frames of ordinary C; a deeper stack fails the unwind (a trap).
_UNWIND_PAGES = 1
_UNWIND_HEADER = struct.Struct("<II")  # current position, end: what Asyncify reads at data
# How long the first pre-copy round waits for the run's next migration point, where the size of
# its memory can be read (a run between points: the size last seen is used).
_SIZE_WAIT_S = 0.2
# A pre-copy round makes progress when it is under this fraction of the smallest before it.
_PRECOPY_PROGRESS = 0.75
# Auto-converge (Run.precopy(throttle=True)): the pause at each migration point after the first
# round that made no progress, doubled after each further one, up to the most.
_THROTTLE_FIRST_S = 0.0005
_THROTTLE_MAX_S = 0.016


@dataclass(frozen=True, slots=True)
class Finished:
    exit_code: int
    stdout: bytes
    stderr: bytes
    fuel_used: int
    hops: tuple[str, ...] = ()  # where the run has been, oldest first


@dataclass(frozen=True, slots=True)
class Paused:
    snapshot: Snapshot


@dataclass(slots=True)
class MemoryImage:
    """What the target of a live migration holds of a run's memory, as its source knows it:
    the bytes that ``rounds`` pre-copy rounds have sent (updated in place by the next round)."""

    data: np.ndarray[Any, np.dtype[np.uint8]]
    rounds: int = 0

    @property
    def nbytes(self) -> int:
        return len(self.data)


current = threading.local()  # the Run executing on this thread (host functions find it here)


@dataclass(slots=True)
class Instance:
    """One instance in its own store; memory never moves (wasmtime reserves the whole 4 GiB
    range up front), so its base address and views of it stay valid while the store lives."""

    store: Any
    exports: Any
    memory: Any
    base: int

    def size(self, store: Any = None) -> int:
        return int(self.memory.data_len(self.store if store is None else store))

    def view(self, size: int | None = None) -> np.ndarray[Any, np.dtype[np.uint8]]:
        return memory_image(self.base, self.size() if size is None else size, copy=False)

    def grow_to(self, pages: int) -> None:
        have = self.memory.size(self.store)
        if pages > have:
            try:
                self.memory.grow(self.store, pages - have)
            except wasmtime.WasmtimeError:
                raise JobError(ErrorCode.MEMORY_LIMIT, f"{pages} pages: over the limit") from None

    def close(self) -> None:
        self.store.close()


class Run:
    """One migratable run. ``execute()`` runs it on the calling thread until it finishes
    (:class:`Finished`) or is paused (:class:`Paused`); ``pause()``, ``checkpoint()`` and
    ``precopy_round()`` may be called from other threads meanwhile.

    ``checkpoint_every_s`` / ``checkpoint_every_points`` / ``checkpoint_every_bytes``: take a
    checkpoint when that many seconds / migration points / bytes of I/O progress (read from
    stdin or /scratch plus written to stdout, stderr or /scratch) have passed since the last
    one (or since the start), whichever comes first, handing each to ``on_checkpoint`` (on the
    executing thread, while the run waits).
    ``on_migration_point``: called with the run at each migration point, on the executing
    thread, before the run decides whether to stop there (a scheduler or a test may call
    ``pause()`` from it); ``migration_points`` counts them (the interrupted call a resumed
    run makes again is not counted twice).
    ``on_paused``: called with the pause's snapshot on the executing thread as soon as it is
    captured, before ``execute`` frees the run's memory (tens of milliseconds for a large one):
    what sends the snapshot on belongs here when downtime matters.
    ``paused_at`` / ``resumed_at``: ``time.monotonic()`` when this run stopped at a migration
    point for its pause, and when its rewind reached the interrupted call (downtime figures).
    """

    def __init__(
        self,
        instantiate: Callable[[], Instance],
        snapshot: Snapshot,
        limits: WasmLimits,
        *,
        fresh: bool,
        prepared: Instance | None = None,
    ) -> None:
        self._instantiate = instantiate
        self.snapshot = snapshot
        self.limits = limits
        self.host = WasiHost(snapshot.wasi)
        self.host.at_migration_point = self._at_migration_point
        self._fresh = fresh
        self._prepared = prepared
        self._pause = self.host.wake  # a pause also ends a sleep in poll_oneoff
        self._against: MemoryImage | None = None
        self._checkpoint_now = threading.Event()
        self.checkpoint_every_s: float | None = None
        self.checkpoint_every_points: int | None = None
        self.checkpoint_every_bytes: int | None = None
        self.on_checkpoint: Callable[[Snapshot], None] | None = None
        self.on_migration_point: Callable[[Run], None] | None = None
        self.on_paused: Callable[[Snapshot], None] | None = None
        self._last_checkpoint = time.monotonic()
        self._points_at_checkpoint = 0
        self._progress_at_checkpoint = 0
        self._unwound = False
        self._unwinding = False
        self._rewinding = False
        self._started = False
        # The live instance, for pre-copy readers on other threads: they hold _live_lock while
        # they read, and the store is closed only under it.
        self._live_lock = threading.Lock()
        self._instance: Instance | None = None
        self._live_size = 0  # memory size seen at the last migration point
        # Asking a store for its memory size costs a wasmtime Caller: done at each migration
        # point only once pre-copy has begun.
        self._tracking_size = False
        self._size_seen = threading.Event()
        self._thread: int | None = None  # the thread executing the run
        self.migration_points = 0
        self._host_error: BaseException | None = None
        self.paused_at: float | None = None
        self.resumed_at: float | None = None
        # Seconds the run sleeps at each migration point while a pre-copy slows it down so
        # that its rounds converge (auto-converge); 0: never.
        self.throttle_s = 0.0
        # When paused, leave the instance for close() to free rather than free it before
        # execute returns: tearing down a large memory takes tens of milliseconds, downtime
        # when the snapshot is sent after execute returns (the gateway's answer).
        self.keep_on_pause = False
        self._kept: Instance | None = None

    @property
    def run_id(self) -> str:
        return self.snapshot.run_id

    def close(self) -> None:
        """Drop the instance made ready for this run if it never executes, or the one a
        pause left open (``keep_on_pause``); idempotent."""
        for instance in (self._prepared, self._kept):
            if instance is not None:
                instance.close()
        self._prepared = self._kept = None

    def pause(self, *, against: MemoryImage | None = None) -> None:
        """Stop at the next migration point; ``execute`` then returns Paused. With
        ``against`` (the image the last pre-copy round left at the target), the snapshot is a
        delta: only the chunks that differ from that image."""
        self._against = against
        self._pause.set()

    def checkpoint(self) -> None:
        """Take a checkpoint at the next migration point, then go on."""
        self._checkpoint_now.set()

    def precopy_round(self, previous: MemoryImage | None) -> tuple[MemoryRound, MemoryImage]:
        """One pre-copy round, read from the memory of the executing run (call it from
        another thread). ``previous``: the image the earlier rounds built (None for round 0);
        it is updated in place and returned. Round 0 sends every chunk that is not zero, round
        k the chunks that differ from ``previous``. Memory is read while the run writes it: a
        chunk torn by a concurrent write is sent as read, and the image records exactly what
        was sent, so the next round (or the final delta) sends it again."""
        self._track_size()
        with self._live_lock:
            instance = self._instance
            if instance is None:
                raise JobError(ErrorCode.NO_RUN, f"run {self.run_id} is not executing")
            live = instance.view(max(self._live_size, self.host.known_size))
            image = previous or MemoryImage(np.zeros(len(live), np.uint8))
            if len(image.data) < len(live):  # memory grew: the target's grows with zeros
                grown = np.zeros(len(live), np.uint8)
                grown[: len(image.data)] = image.data
                image.data = grown
            dirty = _chunks.changed(live, image.data[: len(live)])
            chunk_index, chunk_data = _chunks.gather(live, dirty)
        _chunks.apply(image.data, chunk_index, chunk_data)
        message = MemoryRound(
            module=self.snapshot.module,
            run_id=self.run_id,
            number=image.rounds,
            memory_pages=len(live) // _PAGE,
            chunk_index=chunk_index,
            chunk_data=chunk_data,
        )
        image.rounds += 1
        return message, image

    def precopy(
        self,
        send: Callable[[MemoryRound], None],
        *,
        max_rounds: int = 10,
        small_bytes: int = 256 * 1024,
        throttle: bool = False,
    ) -> list[int]:
        """Live migration's source side, from another thread while the run executes: send
        rounds (``send`` delivers each to the target, in order, and returns once it is there)
        until one is small (``small_bytes`` of chunk data), or two in a row are not clearly
        smaller than the smallest so far (the run dirties memory as fast as rounds carry it), or
        ``max_rounds``; then pause against the image they built, so that ``execute()`` returns
        the final delta. Returns the bytes of each round.

        ``throttle`` (auto-converge, for a link slower than the run dirties memory): a round
        without progress slows the run instead of ending the rounds: from then on it sleeps
        at each migration point (0.5 ms, doubled after each further such round, up to 16 ms),
        until a round is small or ``max_rounds``; the run goes at full speed again where it
        resumes."""
        image: MemoryImage | None = None
        sent: list[int] = []
        smallest, stalled = None, 0
        try:
            while len(sent) < max_rounds:
                message, image = self.precopy_round(image)
                send(message)
                size = len(message.chunk_data)
                sent.append(size)
                if size <= small_bytes:
                    break
                if len(sent) == 1:  # round 0 is the whole memory: nothing to compare it with
                    continue
                if smallest is None or size < smallest * _PRECOPY_PROGRESS:
                    smallest, stalled = size, 0
                    continue
                stalled += 1
                if throttle:
                    self.throttle_s = min(_THROTTLE_MAX_S, self.throttle_s * 2 or _THROTTLE_FIRST_S)
                elif stalled == 2:
                    break
            self.pause(against=image)
        finally:
            self.throttle_s = 0.0
        return sent

    def memory_size(self, wait_s: float = 2.0) -> int:
        """Linear memory's size in bytes as of the run's latest migration point (from another
        thread, this waits up to ``wait_s`` for the next one: a checkpoint being encoded, or a
        long computation, may hold it up); 0 when none came."""
        self._track_size()
        # The size read when execution began is stale: wait for one a migration point read.
        if not self._size_seen.wait(wait_s):
            return 0
        return max(self._live_size, self.host.known_size)

    def _track_size(self) -> None:
        """Make sure the memory size pre-copy reads is current. Only the executing thread can
        ask the store, at a migration point; from the first round on it does so at each."""
        if self._tracking_size:
            return
        self._tracking_size = True
        if threading.get_ident() == self._thread:  # at a migration point (on_migration_point)
            instance = self._instance
            if instance is not None:
                self._live_size = instance.size(_hostcall.caller())
        else:
            self._size_seen.clear()
            self._size_seen.wait(_SIZE_WAIT_S)  # a run between points: go with the last size

    # -- execution --------------------------------------------------------------------------

    def execute(self) -> Finished | Paused:
        if self._started:
            raise RuntimeError("a Run executes once; resume its snapshot to go on")
        self._started = True
        self._thread = threading.get_ident()
        instance, self._prepared = self._prepared, None
        try:
            if instance is None:
                instance = self._instantiate()
            store = instance.store
            store.set_fuel(max(0, self.limits.fuel - self.snapshot.fuel_used))
            if self._fresh:
                self._reserve_unwind_buffer(instance)
            else:
                self._restore(instance)
            with self._live_lock:
                self._instance = instance
                self._live_size = instance.size()
            self.host.bind(instance.base, self._live_size, self._memory_size)
            return self._loop(instance)
        except wasmtime.WasmtimeError as exc:
            raise instantiation_error(exc) from None
        finally:
            with self._live_lock:
                self._instance = None
            self.host.unbind()
            if instance is not None and self.keep_on_pause and self._pause.is_set():
                self._kept = instance  # freed by close()
            elif instance is not None:
                instance.close()

    def _loop(self, instance: Instance) -> Finished | Paused:
        store, exports = instance.store, instance.exports
        start = exports["_start"]
        rewind = not self._fresh
        while True:
            if rewind:
                self._rewinding = True
                exports["asyncify_start_rewind"](store, self.snapshot.unwind_data)
            exit_code = self._call_start(start, instance)
            if not self._unwound:
                return self._finish(store, exit_code)
            self._unwound = self._unwinding = False
            exports["asyncify_stop_unwind"](store)
            paused = self._pause.is_set()
            snapshot = self._capture(instance, self._against if paused else None)
            if paused:
                if self.on_paused is not None:
                    self.on_paused(snapshot)  # before the instance is torn down, below
                return Paused(snapshot)
            if self.on_checkpoint is not None:
                self.on_checkpoint(snapshot)
            rewind = True

    def _memory_size(self) -> int:
        instance = self._instance
        return 0 if instance is None else instance.size(_hostcall.caller())

    def _call_start(self, start: Any, instance: Instance) -> int:
        """Run (or rewind into) ``_start``; its exit status, or the error that ended it."""
        current.run = self
        try:
            try:
                start(instance.store)
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                # A host function's exception ends the call (wasmtime reports the trap its
                # callback returned as an error); here it is again.
                failure, self._host_error = self._host_error, None
                if failure is not None:
                    raise failure from None
                raise self._trap(exc, instance) from None
            return 0
        except Exit as exc:
            return exc.code
        except OutputLimit:
            raise JobError(
                ErrorCode.OUTPUT_LIMIT, f"output over {self.limits.output_bytes} bytes"
            ) from None
        except GuestFault as exc:
            raise JobError(ErrorCode.TRAP, str(exc)) from None
        finally:
            current.run = None

    def _finish(self, store: Any, exit_code: int) -> Finished:
        if self.host.scratch_bytes() > self.limits.scratch_bytes:
            raise JobError(ErrorCode.OUTPUT_LIMIT, f"/scratch over {self.limits.scratch_bytes}")
        fuel_used = self.limits.fuel - store.get_fuel()
        self.snapshot.fuel_used = fuel_used
        self.snapshot.finished = True
        self.snapshot.exit_code = exit_code
        return Finished(
            exit_code, self.host.stdout, self.host.stderr, fuel_used, tuple(self.snapshot.hops)
        )

    def _trap(self, exc: Any, instance: Instance) -> JobError:
        if getattr(exc, "trap_code", None) == wasmtime.TrapCode.OUT_OF_FUEL:
            return JobError(ErrorCode.TIMEOUT, f"fuel exhausted ({self.limits.fuel} units)")
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if self._unwinding:
            return JobError(
                ErrorCode.TRAP,
                f"the stack is too deep to unwind into {_UNWIND_PAGES * _PAGE} bytes",
            )
        # A failed memory.grow returns -1 to the guest; most programs then abort. Report that
        # as the memory limit when memory is at the ceiling, as WasmRuntime does.
        size = instance.size()
        if size + max(2 << 20, self.limits.memory_bytes // 16) > self.limits.memory_bytes:
            return JobError(ErrorCode.MEMORY_LIMIT, "memory limit reached")
        return JobError(ErrorCode.TRAP, lines[-1][:300] if lines else "trap")

    def _at_migration_point(self) -> bool:
        """Called by the host at each call Asyncify can unwind, before the call does
        anything. True: the stack is unwinding (the host returns at once)."""
        if self._rewinding:
            # The rewind has reached the interrupted call: from here on it runs normally.
            caller = _hostcall.caller()
            caller["asyncify_stop_rewind"](caller)
            self._rewinding = False
            self.resumed_at = time.monotonic()
            return False
        self.migration_points += 1
        instance = self._instance
        if self._tracking_size and instance is not None:
            self._live_size = instance.size(_hostcall.caller())
            self._size_seen.set()
        if self.on_migration_point is not None:
            self.on_migration_point(self)
        if not (self._pause.is_set() or self._checkpoint_now.is_set() or self._checkpoint_due()):
            if self.throttle_s:
                time.sleep(self.throttle_s)  # auto-converge (precopy): the rounds catch up
            return False
        self._checkpoint_now.clear()
        if self._pause.is_set():
            self.paused_at = time.monotonic()
        data = self.snapshot.unwind_data
        header = _UNWIND_HEADER.pack(data + _UNWIND_HEADER.size, data + self.snapshot.unwind_bytes)
        ctypes.memmove(self.host.base + data, header, len(header))
        caller = _hostcall.caller()
        caller["asyncify_start_unwind"](caller, data)
        self._unwound = self._unwinding = True
        return True

    def _checkpoint_due(self) -> bool:
        every_points = self.checkpoint_every_points
        if every_points is not None and (
            self.migration_points - self._points_at_checkpoint >= every_points
        ):
            return True
        every_bytes = self.checkpoint_every_bytes
        if every_bytes is not None and (
            self.host.progress_bytes - self._progress_at_checkpoint >= every_bytes
        ):
            return True
        every_s = self.checkpoint_every_s
        return every_s is not None and time.monotonic() - self._last_checkpoint >= every_s

    # -- state in and out -------------------------------------------------------------------

    def _reserve_unwind_buffer(self, instance: Instance) -> None:
        # A page of its own past everything the program has: allocators take memory with
        # memory.grow and use only what that returns, never a page the host grew.
        pages = instance.memory.grow(instance.store, _UNWIND_PAGES)
        self.snapshot.unwind_data = pages * _PAGE
        self.snapshot.unwind_bytes = _UNWIND_PAGES * _PAGE

    def _capture(self, instance: Instance, against: MemoryImage | None) -> Snapshot:
        self._last_checkpoint = time.monotonic()
        self._points_at_checkpoint = self.migration_points
        self._progress_at_checkpoint = self.host.progress_bytes
        snap, store = self.snapshot, instance.store
        live = instance.view()
        if against is None:
            chunk_index, chunk_data = _chunks.nonzero(live)
        else:
            chunk_index, chunk_data = _chunks.delta(live, against.data)
        captured = msgspec.structs.replace(
            snap,
            memory_pages=len(live) // _PAGE,
            chunk_index=chunk_index,
            chunk_data=chunk_data,
            globals=[_global_value(name, g, store) for name, g in _globals(instance.exports)],
            fuel_used=self.limits.fuel - store.get_fuel(),
            wasi=copy_state(self.host.sync_state()),
            hops=list(snap.hops),
            precopy_rounds=against.rounds if against is not None else 0,
        )
        snap.seq += 1
        return captured

    def _restore(self, instance: Instance) -> None:
        snap = self.snapshot
        instance.grow_to(snap.memory_pages)
        live = instance.view()
        if not snap.precopy_rounds:
            live[:] = 0  # data segments were applied at instantiation; the snapshot says it all
        _chunks.apply(live, snap.chunk_index, snap.chunk_data)
        by_index = {
            int(name[len(GLOBAL_EXPORT_PREFIX) :]): g for name, g in _globals(instance.exports)
        }
        for value in snap.globals:
            target = by_index.get(value.index)
            if target is None:
                raise JobError(ErrorCode.SNAPSHOT_MISMATCH, f"no global {value.index}")
            target.set_value(instance.store, _to_val(value))


def host_failed(exc: BaseException) -> None:
    current.run._host_error = exc  # the Run executing on this thread


def instantiation_error(exc: Any) -> JobError:
    # Unknown imports (wasi-nn, threads), a memory minimum above the limit.
    text = str(exc).strip()
    message = text.splitlines()[0][:300] if text else "cannot instantiate"
    code = ErrorCode.MEMORY_LIMIT if "memory" in message else ErrorCode.INVALID_MODULE
    return JobError(code, message)


def memory_image(base: int, size: int, *, copy: bool = True) -> np.ndarray[Any, Any]:
    """Linear memory as bytes: a copy, or (``copy=False``) a live view, valid while the
    instance lives (what pre-copy reads while the run goes on)."""
    view = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(base))
    return view.copy() if copy else view


def _globals(exports: Any) -> list[tuple[str, Any]]:
    return [(name, item) for name, item in exports.items() if name.startswith(GLOBAL_EXPORT_PREFIX)]


def _global_value(name: str, item: Any, store: Any) -> GlobalValue:
    kind = str(item.type(store).content)
    index = int(name[len(GLOBAL_EXPORT_PREFIX) :])
    return GlobalValue(index, kind, item.value(store))  # type: ignore[arg-type]


def _to_val(value: GlobalValue) -> Any:
    if value.type in ("i32", "i64"):
        make_int = wasmtime.Val.i32 if value.type == "i32" else wasmtime.Val.i64
        return make_int(int(value.value))
    make_float = wasmtime.Val.f32 if value.type == "f32" else wasmtime.Val.f64
    return make_float(float(value.value))


def copy_state(state: WasiState) -> WasiState:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=WasiState)
