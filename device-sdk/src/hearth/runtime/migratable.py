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
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec

from hearth.errors import ErrorCode, JobError
from hearth.runtime import _chunks, _hostcall
from hearth.runtime._run import (
    Finished,
    Instance,
    MemoryImage,
    Paused,
    Run,
    copy_state,
    current,
    host_failed,
    instantiation_error,
    memory_image,
)
from hearth.runtime.asyncify import is_instrumented
from hearth.runtime.limits import WasmLimits
from hearth.runtime.snapshot import MemoryRound, Snapshot
from hearth.runtime.wasi_host import WasiHost, WasiState
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
            return bound(current.run.host, *args)

        if not _hostcall.define(
            self._linker,
            module,
            name,
            params=params,
            result=result,
            call=call,
            on_error=host_failed,
            keep=self._keep,
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
            f"{i.module}.{i.name}"
            for i in module.imports
            if i.module != "wasi_snapshot_preview1"
            and (i.module, i.name) not in _MIGRATION_SAFE_IMPORTS
        )
        if foreign:
            raise JobError(
                ErrorCode.INVALID_MODULE, f"cannot migrate a module importing {foreign[0]}"
            )
        self._stub_unknown(module)
        return module

    def _instantiate(self, module: Any, limits: WasmLimits) -> Instance:
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
            return Instance(store, exports, memory, base)
        except wasmtime.WasmtimeError as exc:
            store.close()
            raise instantiation_error(exc) from None
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
            data_class=data_class,
            wasi=state,
            hops=[where],
        )
        module = self.module(sha256, wasm, path)
        return Run(lambda: self._instantiate(module, limits), snapshot, limits, fresh=True)

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
        limits = limits or WasmLimits()
        return Run(
            lambda: self._instantiate(module, limits),
            _continued(snapshot, where),
            limits,
            fresh=False,
        )

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
        self._instance: Instance | None = runtime._instantiate(module, limits)
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
        instance.grow_to(memory_round.memory_pages)
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
            lambda: instance,
            _continued(snapshot, where),
            self.limits,
            fresh=False,
            prepared=instance,
        )

    def complete(self, snapshot: Snapshot) -> Snapshot:
        """The whole snapshot the rounds and the final delta make together, to go on anywhere
        (not here: use :meth:`resume` for that); this Incoming is used up."""
        instance = self._waiting()
        if snapshot.module != self.module_sha256 or snapshot.run_id != self.run_id:
            raise JobError(ErrorCode.SNAPSHOT_MISMATCH, "the snapshot of another run")
        if snapshot.precopy_rounds != self.rounds:
            raise JobError(ErrorCode.SNAPSHOT_MISMATCH, "a delta against other rounds")
        try:
            instance.grow_to(snapshot.memory_pages)
            memory = instance.view()
            _chunks.apply(memory, snapshot.chunk_index, snapshot.chunk_data)
            chunk_index, chunk_data = _chunks.nonzero(memory)
        finally:
            self.close()
        return msgspec.structs.replace(
            snapshot, chunk_index=chunk_index, chunk_data=chunk_data, precopy_rounds=0
        )

    def _waiting(self) -> Instance:
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


def _continued(snapshot: Snapshot, where: str) -> Snapshot:
    """A private copy of ``snapshot`` for a run that goes on from it at ``where``."""
    return msgspec.structs.replace(
        snapshot,
        seq=snapshot.seq + 1,
        wasi=copy_state(snapshot.wasi),
        hops=[*snapshot.hops, where],
        globals=list(snapshot.globals),
    )


def _refuse(result: bool) -> Callable[..., int | None]:
    return lambda *_args: _ENOSYS if result else None
