"""Migratable runs: a WASI command that can stop anywhere it calls WASI and go on elsewhere.

The module is instrumented once (hearth.runtime.asyncify). A run executes it under the Python
WASI host (hearth.runtime.wasi_host) on the calling thread. At each migration point the host
looks at what the run has been asked to do:

- **pause**: unwind the stack into the Asyncify buffer, capture memory, globals and WASI state
  as a :class:`Snapshot`, and return it: the run is over here and can resume anywhere;
- **checkpoint** (periodic, or asked for): the same capture, handed to ``on_checkpoint``, then
  rewind in place and carry on (a few hundred microseconds for a small run);
- otherwise: do the call.

Resuming instantiates the module afresh, writes memory and globals back, and rewinds: the
interrupted call is made again from its start, so the program cannot tell it moved. Output is
carried in the snapshot (everything written so far), so the final stdout of a run that moved
is byte-identical to that of a run that did not.

What cannot migrate, and why: modules that import anything but WASI preview 1 and
``hearth.yield`` (wasi-nn holds native graph handles; threads have stacks Asyncify does not
see); a run between two migration points (a loop without WASI calls: add ``hearth_yield()``).
"""

from __future__ import annotations

import ctypes
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from hearth.errors import ErrorCode, JobError
from hearth.runtime.asyncify import GLOBAL_EXPORT_PREFIX, is_instrumented
from hearth.runtime.limits import WasmLimits
from hearth.runtime.snapshot import CHUNK_BYTES, GlobalValue, Snapshot
from hearth.runtime.wasi_host import Exit, WasiHost, WasiState
from hearth.runtime.wasm import WasmRuntime

try:
    import wasmtime
except ImportError:  # pragma: no cover - exercised only without the `local` extra
    wasmtime = None  # type: ignore[assignment]

__all__ = ["Finished", "MigratableRuntime", "Paused", "Run", "memory_image"]

_PAGE = 65536
# The Asyncify buffer: where the unwound stack (each frame's live locals) is kept. 64 KiB
# holds hundreds of frames of ordinary C; a deeper stack fails the unwind, not the program.
_UNWIND_PAGES = 1
_CHUNKS_PER_PAGE = _PAGE // CHUNK_BYTES

_I32 = "i"
_I64 = "I"
# name: (parameter types, has a result, needs the caller to unwind). "I" is i64.
_WASI_SIGNATURES: dict[str, tuple[str, bool, bool]] = {
    "args_get": ("ii", True, False),
    "args_sizes_get": ("ii", True, False),
    "environ_get": ("ii", True, False),
    "environ_sizes_get": ("ii", True, False),
    "clock_res_get": ("ii", True, False),
    "clock_time_get": ("iIi", True, False),
    "random_get": ("ii", True, False),
    "proc_exit": ("i", False, False),
    "sched_yield": ("", True, True),
    "poll_oneoff": ("iiii", True, True),
    "fd_read": ("iiii", True, True),
    "fd_write": ("iiii", True, True),
    "fd_close": ("i", True, False),
    "fd_fdstat_get": ("ii", True, False),
    "fd_fdstat_set_flags": ("ii", True, False),
    "fd_prestat_get": ("ii", True, False),
    "fd_prestat_dir_name": ("iii", True, False),
    "fd_seek": ("iIii", True, False),
    "fd_tell": ("ii", True, False),
    "fd_filestat_get": ("ii", True, False),
    "fd_readdir": ("iiiIi", True, False),
    "path_open": ("iiiiiIIii", True, False),
    "path_filestat_get": ("iiiii", True, False),
    "path_create_directory": ("iii", True, False),
    "path_unlink_file": ("iii", True, False),
    "path_remove_directory": ("iii", True, False),
}
_ENOSYS = 52


@dataclass(frozen=True, slots=True)
class Finished:
    exit_code: int
    stdout: bytes
    stderr: bytes
    fuel_used: int


@dataclass(frozen=True, slots=True)
class Paused:
    snapshot: Snapshot


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
        self._lock = threading.Lock()
        for name, (params, result, caller) in _WASI_SIGNATURES.items():
            self._define("wasi_snapshot_preview1", name, params, result, caller, name)
        self._define("hearth", "yield", "", False, True, "hearth_yield")

    def _define(
        self, module: str, name: str, params: str, result: bool, caller: bool, method: str
    ) -> None:
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        ty = wasmtime.FuncType([i64 if p == _I64 else i32 for p in params], [i32] if result else [])

        def call(*args: Any) -> Any:
            return getattr(_current.run.host, method)(*args)

        self._linker.define_func(module, name, ty, call, access_caller=caller)
        self._defined.add((module, name))

    def _stub_unknown(self, module: wasmtime.Module) -> None:
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
        module = self._wasm.module(sha256, wasm, path)
        if not is_instrumented({e.name for e in module.exports}):
            raise JobError(
                ErrorCode.INVALID_MODULE,
                "not a migratable module: instrument it first (hearth.runtime.asyncify)",
            )
        self._stub_unknown(module)
        return module

    def start(
        self,
        sha256: str,
        *,
        args: list[str] | tuple[str, ...] = (),
        stdin: bytes = b"",
        limits: WasmLimits | None = None,
        run_id: str | None = None,
        data_class: str = "private",
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
        """Continue ``snapshot`` here (``where`` names this runtime in the run's hops)."""
        module = self.module(snapshot.module, wasm, path)
        snapshot.hops = [*snapshot.hops, where]
        return Run(self, module, snapshot, limits or WasmLimits(), fresh=False)

    @property
    def linker(self) -> Any:
        return self._linker


class Run:
    """One migratable run. ``execute()`` runs it on the calling thread until it finishes
    (:class:`Finished`) or is paused (:class:`Paused`); ``pause()``, ``checkpoint()`` and
    ``precopy_view()`` may be called from other threads meanwhile."""

    def __init__(
        self,
        runtime: MigratableRuntime,
        module: Any,
        snapshot: Snapshot,
        limits: WasmLimits,
        *,
        fresh: bool,
    ) -> None:
        self._runtime = runtime
        self._module = module
        self.snapshot = snapshot
        self.limits = limits
        self.host = WasiHost(snapshot.wasi)
        self.host.at_migration_point = self._at_migration_point
        self._fresh = fresh
        self._pause = threading.Event()
        self._checkpoint_now = threading.Event()
        self.checkpoint_every_s: float | None = None
        self.on_checkpoint: Callable[[Snapshot], None] | None = None
        self._last_checkpoint = time.monotonic()
        self._unwound = False
        self._rewinding = False
        self._memory_base = 0
        self._memory: Any = None
        self._store: Any = None
        self.migration_points = 0

    @property
    def run_id(self) -> str:
        return self.snapshot.run_id

    def pause(self) -> None:
        """Stop at the next migration point; ``execute`` then returns Paused."""
        self._pause.set()

    def checkpoint(self) -> None:
        """Take a checkpoint at the next migration point, then go on."""
        self._checkpoint_now.set()

    # -- execution --------------------------------------------------------------------------

    def execute(self) -> Finished | Paused:
        store = wasmtime.Store(self._runtime._wasm.engine)
        self._store = store
        instance = None
        try:
            store.set_fuel(max(0, self.limits.fuel - self.snapshot.fuel_used))
            store.set_limits(memory_size=self.limits.memory_bytes)
            instance = self._runtime.linker.instantiate(store, self._module)
            exports = instance.exports(store)
            memory = exports["memory"]
            self._memory = memory
            if self._fresh:
                self._reserve_unwind_buffer(store, memory)
            else:
                self._restore(store, exports, memory)
            self._memory_base = ctypes.addressof(memory.data_ptr(store).contents)
            self.host.bind(self._memory_base)
            return self._loop(store, exports)
        except wasmtime.WasmtimeError as exc:
            message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "error"
            code = ErrorCode.MEMORY_LIMIT if "memory" in message else ErrorCode.INVALID_MODULE
            raise JobError(code, message) from None
        finally:
            self._memory = None
            self._store = None
            store.close()

    def _loop(self, store: Any, exports: Any) -> Finished | Paused:
        start = exports["_start"]
        rewind = not self._fresh
        self._fresh = False
        while True:
            if rewind:
                self._rewinding = True
                exports["asyncify_start_rewind"](store, self.snapshot.unwind_data)
            _current.run = self
            try:
                start(store)
                exit_code = 0
            except Exit as exc:
                exit_code = exc.code
            except wasmtime.Trap as exc:
                raise self._trap(exc, store) from None
            finally:
                _current.run = None
            if self.host.state.output_overflowed:
                raise JobError(
                    ErrorCode.OUTPUT_LIMIT, f"output over {self.limits.output_bytes} bytes"
                )
            if not self._unwound:
                return self._finish(store, exit_code)
            self._unwound = False
            exports["asyncify_stop_unwind"](store)
            snapshot = self._capture(store, exports)
            if self._pause.is_set():
                return Paused(snapshot)
            if self.on_checkpoint is not None:
                self.on_checkpoint(snapshot)
            rewind = True

    def _finish(self, store: Any, exit_code: int) -> Finished:
        if self.host.scratch_bytes() > self.limits.scratch_bytes:
            raise JobError(ErrorCode.OUTPUT_LIMIT, f"/scratch over {self.limits.scratch_bytes}")
        fuel_used = self.limits.fuel - store.get_fuel()
        self.snapshot.fuel_used = fuel_used
        self.snapshot.finished = True
        self.snapshot.exit_code = exit_code
        return Finished(exit_code, self.host.stdout, self.host.stderr, fuel_used)

    def _trap(self, exc: Any, store: Any) -> JobError:
        if exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            return JobError(ErrorCode.TIMEOUT, f"fuel exhausted ({self.limits.fuel} units)")
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        memory = self._memory
        if memory is not None:
            size = memory.data_len(store)
            if size + max(2 << 20, self.limits.memory_bytes // 16) > self.limits.memory_bytes:
                return JobError(ErrorCode.MEMORY_LIMIT, "memory limit reached")
        return JobError(ErrorCode.TRAP, lines[-1][:300] if lines else "trap")

    def _at_migration_point(self, caller: Any) -> bool:
        """Called by the host at each call Asyncify can unwind, before the call does
        anything. True: the stack is unwinding (the host returns at once)."""
        if self._rewinding:
            # The rewind has reached the interrupted call: from here on it runs normally.
            caller.get("asyncify_stop_rewind")(caller)
            self._rewinding = False
            return False
        self.migration_points += 1
        due = self._pause.is_set() or self._checkpoint_now.is_set()
        if not due and self.checkpoint_every_s is not None:
            due = time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s
        if not due:
            return False
        self._checkpoint_now.clear()
        data = self.snapshot.unwind_data
        ctypes.memmove(
            self._memory_base + data,
            np.array([data + 8, data + self.snapshot.unwind_bytes], dtype="<u4").tobytes(),
            8,
        )
        caller.get("asyncify_start_unwind")(caller, data)
        self._unwound = True
        return True

    # -- state in and out -------------------------------------------------------------------

    def _reserve_unwind_buffer(self, store: Any, memory: Any) -> None:
        pages = memory.grow(store, _UNWIND_PAGES)
        self.snapshot.unwind_data = pages * _PAGE
        self.snapshot.unwind_bytes = _UNWIND_PAGES * _PAGE

    def _capture(self, store: Any, exports: Any) -> Snapshot:
        self._last_checkpoint = time.monotonic()
        snap = self.snapshot
        image = memory_image(self._memory_base, self._memory.data_len(store))
        snap.memory_pages = len(image) // _PAGE
        snap.chunk_index, snap.chunk_data = _sparse(image)
        snap.globals = [_global_value(name, g, store) for name, g in _globals(exports)]
        snap.fuel_used = self.limits.fuel - store.get_fuel()
        snap.wasi = self.host.sync_state()
        captured = Snapshot(**{f: getattr(snap, f) for f in snap.__struct_fields__})
        captured.wasi = _copy_state(snap.wasi)
        snap.seq += 1
        return captured

    def _restore(self, store: Any, exports: Any, memory: Any) -> None:
        snap = self.snapshot
        have = memory.size(store)
        if snap.memory_pages > have:
            memory.grow(store, snap.memory_pages - have)
        base = ctypes.addressof(memory.data_ptr(store).contents)
        image = memory_image(base, memory.data_len(store), copy=False)
        image[:] = 0  # data segments were applied at instantiation; the snapshot says it all
        index = np.frombuffer(snap.chunk_index, dtype="<u4")
        if len(index):
            chunks = image[: snap.memory_pages * _PAGE].reshape(-1, CHUNK_BYTES)
            chunks[index] = np.frombuffer(snap.chunk_data, dtype=np.uint8).reshape(-1, CHUNK_BYTES)
        by_index = {int(name[len(GLOBAL_EXPORT_PREFIX) :]): g for name, g in _globals(exports)}
        for value in snap.globals:
            target = by_index.get(value.index)
            if target is None:
                raise JobError(ErrorCode.SNAPSHOT_MISMATCH, f"no global {value.index}")
            target.set_value(store, _to_val(value))


def _refuse(result: bool) -> Callable[..., int | None]:
    return lambda *_args: _ENOSYS if result else None


def memory_image(base: int, size: int, *, copy: bool = True) -> np.ndarray[Any, Any]:
    """Linear memory as bytes: a copy, or (``copy=False``) a live view, valid while the
    instance lives (what pre-copy reads while the run goes on)."""
    view = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(base))
    return view.copy() if copy else view


def _sparse(image: np.ndarray[Any, Any]) -> tuple[bytes, bytes]:
    chunks = image.reshape(-1, CHUNK_BYTES)
    used = np.flatnonzero(chunks.view(np.uint64).any(axis=1))
    return used.astype("<u4").tobytes(), chunks[used].tobytes()


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
