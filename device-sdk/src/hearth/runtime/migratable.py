"""Migratable runs: a WASI command that can stop anywhere it calls WASI and go on elsewhere.

The module is instrumented once (hearth.runtime.asyncify). A run executes it under the Python
WASI host (hearth.runtime.wasi_host) on the calling thread. At each migration point the host
looks at what the run has been asked to do:

- **pause**: unwind the stack into the Asyncify buffer, capture memory, globals and WASI state
  as a :class:`Snapshot`, and return it: the run is over here and can resume anywhere;
- **checkpoint** (every so many seconds or migration points, or asked for): the same capture,
  handed to ``on_checkpoint``, then rewind in place and carry on;
- otherwise: do the call.

Resuming instantiates the module afresh, writes memory and globals back, and rewinds: the
interrupted call is made again from its start, so the program cannot tell it moved. Output is
carried in the snapshot (everything written so far), so the final stdout of a run that moved
is byte-identical to that of a run that did not.

Live migration of a run with much memory (pre-copy): while the run goes on, another thread
sends its memory ahead in rounds (:meth:`Run.precopy_round`), each with only the chunks that
changed since the last; the target fills a ready instance with them (:class:`Incoming`). Then
the run is paused against the image the target holds (``pause(against=...)``) and the final
snapshot carries only the chunks dirtied since, with globals and WASI state: the run is stopped
for the time that small delta takes, not for the time the whole memory takes.

What cannot migrate, and why: modules that import anything but WASI preview 1 and
``hearth.yield`` (wasi-nn holds native graph handles; threads have stacks Asyncify does not
see); a run between two migration points (a loop without WASI calls: add ``hearth_yield()``).
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from hearth.errors import ErrorCode, JobError
from hearth.runtime import _chunks, _hostcall
from hearth.runtime.asyncify import GLOBAL_EXPORT_PREFIX, is_instrumented
from hearth.runtime.limits import WasmLimits
from hearth.runtime.snapshot import GlobalValue, MemoryRound, Snapshot
from hearth.runtime.wasi_host import Exit, GuestFault, OutputLimit, WasiHost, WasiState
from hearth.runtime.wasm import WasmRuntime

try:
    import wasmtime
except ImportError:  # pragma: no cover - exercised only without the `local` extra
    wasmtime = None  # type: ignore[assignment]

__all__ = [
    "Finished",
    "Incoming",
    "MemoryImage",
    "MigratableRuntime",
    "Paused",
    "Run",
    "memory_image",
]

_PAGE = 65536
# The Asyncify buffer: where the unwound stack (each frame's live locals) is kept. 64 KiB
# holds hundreds of frames of ordinary C; a deeper stack fails the unwind (a trap).
_UNWIND_PAGES = 1
_UNWIND_HEADER = struct.Struct("<II")
# How long the first pre-copy round waits for the run's next migration point, where the size of
# its memory can be read (a run between points: the size last seen is used).
_SIZE_WAIT_S = 0.2
# A pre-copy round makes progress when it is under this fraction of the smallest before it.
_PRECOPY_PROGRESS = 0.75  # current position, end: what Asyncify reads at data

_I64 = "I"
# name: (parameter types, has a result). "I" is i64, "i" i32.
_WASI_SIGNATURES: dict[str, tuple[str, bool]] = {
    "args_get": ("ii", True),
    "args_sizes_get": ("ii", True),
    "environ_get": ("ii", True),
    "environ_sizes_get": ("ii", True),
    "clock_res_get": ("ii", True),
    "clock_time_get": ("iIi", True),
    "random_get": ("ii", True),
    "proc_exit": ("i", False),
    "sched_yield": ("", True),
    "poll_oneoff": ("iiii", True),
    "fd_read": ("iiii", True),
    "fd_write": ("iiii", True),
    "fd_close": ("i", True),
    "fd_fdstat_get": ("ii", True),
    "fd_fdstat_set_flags": ("ii", True),
    "fd_prestat_get": ("ii", True),
    "fd_prestat_dir_name": ("iii", True),
    "fd_seek": ("iIii", True),
    "fd_tell": ("ii", True),
    "fd_filestat_get": ("ii", True),
    "fd_readdir": ("iiiIi", True),
    "path_open": ("iiiiiIIii", True),
    "path_filestat_get": ("iiiii", True),
    "path_create_directory": ("iii", True),
    "path_unlink_file": ("iii", True),
    "path_remove_directory": ("iii", True),
}
_ENOSYS = 52
_MIGRATION_SAFE_IMPORTS = (("hearth", "yield"),)


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


_current = threading.local()  # the Run executing on this thread (host functions find it here)


class MigratableRuntime:
    """Runs instrumented modules under the Python WASI host. One per process (like
    WasmRuntime, whose engine and compiled-module cache it shares); thread-safe, a run per
    thread at a time."""

    def __init__(self, wasm: WasmRuntime) -> None:
        if wasmtime is None:  # pragma: no cover
            raise JobError(ErrorCode.UNSUPPORTED, "migratable runs need wasmtime")
        self._wasm = wasm
        self._linker = wasmtime.Linker(wasm.engine)
        self._defined: set[tuple[str, str]] = set()
        self._keep: list[object] = []  # the native callbacks, alive as long as the linker
        # The linker is shared by every run: defining a stub while another thread instantiates
        # from it is a data race in wasmtime, so both happen under this lock (both are short).
        self._lock = threading.Lock()
        for name, (params, result) in _WASI_SIGNATURES.items():
            self._define("wasi_snapshot_preview1", name, params, result, name)
        self._define("hearth", "yield", "", False, "hearth_yield")

    def _define(self, module: str, name: str, params: str, result: bool, method: str) -> None:
        bound = getattr(WasiHost, method)

        def call(*args: Any) -> Any:
            return bound(_current.run.host, *args)

        if not _hostcall.define(
            self._linker, module, name, params, result, call, on_error=_host_failed, keep=self._keep
        ):  # pragma: no cover - a wasmtime-py without the raw bindings: its own trampoline

            def slow(the_caller: Any, *args: Any) -> Any:
                with _hostcall.inside(the_caller):
                    return call(*args)

            i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
            types = [i64 if p == _I64 else i32 for p in params]
            ty = wasmtime.FuncType(types, [i32] if result else [])
            self._linker.define_func(module, name, ty, slow, access_caller=True)
        self._defined.add((module, name))

    def _stub_unknown(self, module: Any) -> None:
        """WASI calls outside the sandbox (sockets...) answer ENOSYS rather than failing the
        instantiation, as a module granted nothing would see under wasmtime's WASI."""
        for imp in module.imports:
            key = (imp.module, imp.name or "")
            if key in self._defined or imp.module != "wasi_snapshot_preview1":
                continue
            ty = imp.type
            if not isinstance(ty, wasmtime.FuncType):
                continue
            with self._lock:
                if key in self._defined:
                    continue
                self._linker.define_func(key[0], key[1], ty, _refuse(bool(list(ty.results))))
                self._defined.add(key)

    def module(self, sha256: str, wasm: bytes | None = None, path: Path | None = None) -> Any:
        """The compiled module (cached by the WasmRuntime); INVALID_MODULE unless it is an
        instrumented WASI command that exports its memory."""
        module = self._wasm.module(sha256, wasm, path)
        exports = {e.name for e in module.exports}
        if not is_instrumented(exports):
            raise JobError(
                ErrorCode.INVALID_MODULE,
                "not a migratable module: instrument it first (hearth.runtime.asyncify)",
            )
        if "_start" not in exports or "memory" not in exports:
            raise JobError(ErrorCode.INVALID_MODULE, "not a WASI command exporting its memory")
        # Anything else it imports holds state outside the run (wasi-nn's graphs, threads).
        foreign = sorted(
            {f"{i.module}.{i.name}" for i in module.imports}
            - {f"{m}.{n}" for m, n in _MIGRATION_SAFE_IMPORTS}
        )
        foreign = [name for name in foreign if not name.startswith("wasi_snapshot_preview1.")]
        if foreign:
            raise JobError(
                ErrorCode.INVALID_MODULE, f"cannot migrate a module importing {foreign[0]}"
            )
        self._stub_unknown(module)
        return module

    def _instantiate(self, module: Any, limits: WasmLimits) -> _Instance:
        store = wasmtime.Store(self._wasm.engine)
        try:
            store.set_limits(memory_size=limits.memory_bytes)
            with self._lock:
                instance = self._linker.instantiate(store, module)
            exports = instance.exports(store)
            memory = exports["memory"]
            if not isinstance(memory, wasmtime.Memory):
                raise JobError(ErrorCode.INVALID_MODULE, "its export 'memory' is not a memory")
            base = ctypes.addressof(memory.data_ptr(store).contents)
            return _Instance(store, exports, memory, base)
        except wasmtime.WasmtimeError as exc:
            store.close()
            raise _instantiation_error(exc) from None
        except BaseException:
            store.close()
            raise

    def start(
        self,
        sha256: str,
        *,
        args: list[str] | tuple[str, ...] = (),
        stdin: bytes = b"",
        limits: WasmLimits | None = None,
        run_id: str | None = None,
        data_class: Literal["private", "public"] = "private",
        where: str = "local",
        wasm: bytes | None = None,
        path: Path | None = None,
    ) -> Run:
        """A new run of ``sha256`` (not yet executing: call :meth:`Run.execute`)."""
        limits = limits or WasmLimits()
        state = WasiState(args=["module", *args], stdin=stdin, output_budget=limits.output_bytes)
        snapshot = Snapshot(
            module=sha256,
            run_id=run_id or f"r-{uuid.uuid4().hex[:16]}",
            data_class="public" if data_class == "public" else "private",
            wasi=state,
            hops=[where],
        )
        return Run(self, self.module(sha256, wasm, path), snapshot, limits, fresh=True)

    def resume(
        self,
        snapshot: Snapshot,
        *,
        limits: WasmLimits | None = None,
        where: str = "local",
        wasm: bytes | None = None,
        path: Path | None = None,
    ) -> Run:
        """Continue ``snapshot`` here (``where`` names this runtime in the run's hops). The
        snapshot is not changed: the same one may be resumed again (a checkpoint after a
        crash). A delta (the end of a live migration) resumes only through :class:`Incoming`."""
        if snapshot.finished:
            raise JobError(ErrorCode.RUN_FINISHED, f"run {snapshot.run_id} has already finished")
        if snapshot.precopy_rounds:
            raise JobError(
                ErrorCode.SNAPSHOT_MISMATCH,
                "a delta snapshot resumes only on the instance its pre-copy rounds filled",
            )
        module = self.module(snapshot.module, wasm, path)
        return Run(self, module, _continued(snapshot, where), limits or WasmLimits(), fresh=False)

    def receive(
        self,
        sha256: str,
        run_id: str,
        *,
        limits: WasmLimits | None = None,
        wasm: bytes | None = None,
        path: Path | None = None,
    ) -> Incoming:
        """The target side of a live migration of ``run_id``: an instance made now, whose
        memory the pre-copy rounds fill while the run still goes on at its source."""
        limits = limits or WasmLimits()
        module = self.module(sha256, wasm, path)
        return Incoming(self, module, sha256, run_id, limits)

    @property
    def linker(self) -> Any:
        return self._linker


@dataclass(slots=True)
class _Instance:
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
            self.memory.grow(self.store, pages - have)

    def close(self) -> None:
        self.store.close()


class Incoming:
    """The target of a live migration: an instance made ahead of time, whose memory the
    pre-copy rounds fill (:meth:`apply`, in order) until the final delta snapshot arrives
    (:meth:`resume`). ``close()`` (idempotent) drops it if the migration is abandoned."""

    def __init__(
        self, runtime: MigratableRuntime, module: Any, sha256: str, run_id: str, limits: WasmLimits
    ) -> None:
        self._runtime = runtime
        self._module = module
        self.module_sha256 = sha256
        self.run_id = run_id
        self.limits = limits
        self.rounds = 0
        self.bytes_applied = 0
        self._instance: _Instance | None = runtime._instantiate(module, limits)
        # The instance's data segments are not the run's: its memory is what the rounds say.
        self._instance.view()[:] = 0

    def apply(self, memory_round: MemoryRound) -> None:
        """Write one round's chunks into the waiting instance's memory."""
        instance = self._waiting()
        if memory_round.module != self.module_sha256 or memory_round.run_id != self.run_id:
            raise JobError(ErrorCode.SNAPSHOT_MISMATCH, "a pre-copy round of another run")
        if memory_round.number != self.rounds:
            raise JobError(
                ErrorCode.BAD_SNAPSHOT,
                f"pre-copy round {memory_round.number} where round {self.rounds} was due",
            )
        _grow(instance, memory_round.memory_pages)
        _chunks.apply(instance.view(), memory_round.chunk_index, memory_round.chunk_data)
        self.rounds += 1
        self.bytes_applied += len(memory_round.chunk_data)

    def resume(self, snapshot: Snapshot, *, where: str = "local") -> Run:
        """The run, continued from the final (delta) snapshot on the instance the rounds
        filled; this Incoming is used up (its instance now belongs to the Run)."""
        instance = self._waiting()
        if snapshot.module != self.module_sha256 or snapshot.run_id != self.run_id:
            raise JobError(ErrorCode.SNAPSHOT_MISMATCH, "the snapshot of another run")
        if snapshot.finished:
            raise JobError(ErrorCode.RUN_FINISHED, f"run {snapshot.run_id} has already finished")
        if snapshot.precopy_rounds != self.rounds:
            raise JobError(
                ErrorCode.SNAPSHOT_MISMATCH,
                f"a delta against {snapshot.precopy_rounds} pre-copy rounds; "
                f"{self.rounds} arrived here",
            )
        self._instance = None
        return Run(
            self._runtime,
            self._module,
            _continued(snapshot, where),
            self.limits,
            fresh=False,
            prepared=instance,
        )

    def _waiting(self) -> _Instance:
        if self._instance is None:
            raise JobError(ErrorCode.NO_RUN, "this migration has been resumed or closed")
        return self._instance

    def close(self) -> None:
        instance, self._instance = self._instance, None
        if instance is not None:
            instance.close()

    def __enter__(self) -> Incoming:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Run:
    """One migratable run. ``execute()`` runs it on the calling thread until it finishes
    (:class:`Finished`) or is paused (:class:`Paused`); ``pause()``, ``checkpoint()`` and
    ``precopy_round()`` may be called from other threads meanwhile.

    ``checkpoint_every_s`` / ``checkpoint_every_points``: take a checkpoint when that many
    seconds / migration points have passed since the last one (or since the start), handing
    each to ``on_checkpoint`` (on the executing thread, while the run waits).
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
        runtime: MigratableRuntime,
        module: Any,
        snapshot: Snapshot,
        limits: WasmLimits,
        *,
        fresh: bool,
        prepared: _Instance | None = None,
    ) -> None:
        self._runtime = runtime
        self._module = module
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
        self.on_checkpoint: Callable[[Snapshot], None] | None = None
        self.on_migration_point: Callable[[Run], None] | None = None
        self.on_paused: Callable[[Snapshot], None] | None = None
        self._last_checkpoint = time.monotonic()
        self._points_at_checkpoint = 0
        self._unwound = False
        self._unwinding = False
        self._rewinding = False
        self._started = False
        # The live instance, for pre-copy readers on other threads: they hold _live_lock while
        # they read, and the store is closed only under it.
        self._live_lock = threading.Lock()
        self._instance: _Instance | None = None
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

    @property
    def run_id(self) -> str:
        return self.snapshot.run_id

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
    ) -> list[int]:
        """Live migration's source side, from another thread while the run executes: send
        rounds (``send`` delivers each to the target, in order, and returns once it is there)
        until one is small (``small_bytes`` of chunk data), or two in a row are not clearly
        smaller than the smallest so far (the run dirties memory as fast as rounds carry it), or
        ``max_rounds``; then pause against the image they built, so that ``execute()`` returns
        the final delta. Returns the bytes of each round."""
        image: MemoryImage | None = None
        sent: list[int] = []
        smallest, stalled = None, 0
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
            else:
                stalled += 1
                if stalled == 2:
                    break
        self.pause(against=image)
        return sent

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
                instance = self._runtime._instantiate(self._module, self.limits)
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
            raise _instantiation_error(exc) from None
        finally:
            with self._live_lock:
                self._instance = None
            self.host.unbind()
            if instance is not None:
                instance.close()

    def _loop(self, instance: _Instance) -> Finished | Paused:
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

    def _call_start(self, start: Any, instance: _Instance) -> int:
        """Run (or rewind into) ``_start``; its exit status, or the error that ended it."""
        _current.run = self
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
            _current.run = None

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

    def _trap(self, exc: Any, instance: _Instance) -> JobError:
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
        if not (self._pause.is_set() or self._checkpoint_due()):
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
        if self._checkpoint_now.is_set():
            return True
        every_points = self.checkpoint_every_points
        if every_points is not None and (
            self.migration_points - self._points_at_checkpoint >= every_points
        ):
            return True
        every_s = self.checkpoint_every_s
        return every_s is not None and time.monotonic() - self._last_checkpoint >= every_s

    # -- state in and out -------------------------------------------------------------------

    def _reserve_unwind_buffer(self, instance: _Instance) -> None:
        # A page of its own past everything the program has: allocators take memory with
        # memory.grow and use only what that returns, never a page the host grew.
        pages = instance.memory.grow(instance.store, _UNWIND_PAGES)
        self.snapshot.unwind_data = pages * _PAGE
        self.snapshot.unwind_bytes = _UNWIND_PAGES * _PAGE

    def _capture(self, instance: _Instance, against: MemoryImage | None) -> Snapshot:
        self._last_checkpoint = time.monotonic()
        self._points_at_checkpoint = self.migration_points
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
            wasi=_copy_state(self.host.sync_state()),
            hops=list(snap.hops),
            precopy_rounds=against.rounds if against is not None else 0,
        )
        snap.seq += 1
        return captured

    def _restore(self, instance: _Instance) -> None:
        snap = self.snapshot
        _grow(instance, snap.memory_pages)
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


def _host_failed(exc: BaseException) -> None:
    _current.run._host_error = exc  # the Run executing on this thread


def _grow(instance: _Instance, pages: int) -> None:
    try:
        instance.grow_to(pages)
    except wasmtime.WasmtimeError:
        raise JobError(ErrorCode.MEMORY_LIMIT, f"{pages} pages are over the limit") from None


def _continued(snapshot: Snapshot, where: str) -> Snapshot:
    """A private copy of ``snapshot`` for a run that goes on from it at ``where``."""
    return msgspec.structs.replace(
        snapshot,
        seq=snapshot.seq + 1,
        wasi=_copy_state(snapshot.wasi),
        hops=[*snapshot.hops, where],
        globals=list(snapshot.globals),
    )


def _instantiation_error(exc: Any) -> JobError:
    # Unknown imports (wasi-nn, threads), a memory minimum above the limit.
    text = str(exc).strip()
    message = text.splitlines()[0][:300] if text else "cannot instantiate"
    code = ErrorCode.MEMORY_LIMIT if "memory" in message else ErrorCode.INVALID_MODULE
    return JobError(code, message)


def _refuse(result: bool) -> Callable[..., int | None]:
    return lambda *_args: _ENOSYS if result else None


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


def _copy_state(state: WasiState) -> WasiState:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=WasiState)
