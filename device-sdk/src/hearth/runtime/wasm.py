"""WASI command modules under wasmtime: args and stdin in; stdout, stderr and exit code out.

The sandbox is what WASI gives when almost nothing is granted: one fresh, empty directory per
run preopened as ``/scratch`` for modules that import a call able to reach it (what the run
leaves there is removed when it ends, whatever happens) and nothing else of the filesystem, no
sockets (preview 1 cannot create any and none are preopened), an empty environment. Limits are
explicit (fuel, memory, output, scratch bytes) and each failure maps to one ErrorCode.

What every run of a module needs is worked out once, when it is compiled (``_Prepared``): its
imports resolved (a wasmtime ``InstancePre``), whether it gets wasi-nn and a ``/scratch``. Stdin
is handed to wasmtime as bytes (no file), and a module without ``/scratch`` writes its stdout and
stderr through our own ``fd_write``: one copy from its memory per call.

Where onnxruntime is installed, modules may also import wasi-nn (``wasi_ephemeral_nn``, see
hearth.runtime.wasi_nn): they keep pre- and post-processing in WebAssembly and run the model
on the box's execution provider.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hearth.errors import ErrorCode, JobError, LocalRuntimeUnavailable
from hearth.runtime._blob import WASM_MAGIC, verified_bytes
from hearth.runtime.limits import WasmLimits
from hearth.runtime.wasi_nn import WasiNn

try:
    import wasmtime
except ImportError:  # pragma: no cover - exercised only without the `local` extra
    wasmtime = None  # type: ignore[assignment]

__all__ = [
    "SCRATCH_GUEST_PATH",
    "WASM_MAGIC",
    "WasmOutcome",
    "WasmRuntime",
    "refuse_text",
    "remove_tree",
]

log = logging.getLogger(__name__)

_WASM_PAGE = 64 * 1024  # bytes
SCRATCH_GUEST_PATH = "/scratch"
_WASI = "wasi_snapshot_preview1"
# WASI errnos (preview 1) our fd_write returns.
_WASI_EBADF, _WASI_EFAULT, _WASI_EFBIG = 8, 21, 22
_IOVEC = struct.Struct("<II")
_U32 = struct.Struct("<I")


def _reaches_directories(name: str) -> bool:
    """Whether a WASI import lets a module find or use a preopened directory: the
    ``path_*`` calls act inside one, ``fd_prestat_*`` is how programs discover it and
    ``fd_readdir`` lists it. A module importing none of them cannot see ``/scratch``."""
    return name.startswith(("path_", "fd_prestat_")) or name == "fd_readdir"


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A compiled module with what each run of it needs worked out once: its imports
    resolved against the run linker (``pre``; None when they cannot be, and then
    instantiating reports why), and whether it gets wasi-nn and a ``/scratch``."""

    module: wasmtime.Module
    pre: wasmtime.InstancePre | None
    nn: bool
    scratch: bool


@dataclass(frozen=True, slots=True)
class WasmOutcome:
    exit_code: int
    stdout: bytes
    stderr: bytes
    fuel_used: int


class _Output:
    """Collects one stream while the shared budget lasts; past it, writes fail with EFBIG inside
    the guest and the run is reported as output_limit whatever the module does next."""

    def __init__(self, budget: list[int], store: wasmtime.Store) -> None:
        self._chunks: list[bytes] = []
        self._budget = budget
        self._store = store
        self.overflowed = False

    def write(self, data: bytes) -> int:
        if len(data) > self._budget[0]:
            self.overflowed = True
            # Programs commonly ignore write errors and keep writing; taking the fuel away
            # stops the guest at its next instruction instead of after its whole budget.
            self._store.set_fuel(0)
            return -errno.EFBIG
        self._budget[0] -= len(data)
        self._chunks.append(data)
        return len(data)

    def value(self) -> bytes:
        return b"".join(self._chunks)


class WasmRuntime:
    """One wasmtime Engine plus a cache of compiled modules keyed by sha256.

    With ``cache_dir`` set, compiled modules are also serialized to disk (keyed by hash and
    wasmtime version), so a module known from an earlier run starts without recompiling.
    ``wasi_nn``: "auto" defines wasi-nn where onnxruntime is installed (its OnnxRuntime is only
    created when a module first loads a model); a WasiNn to choose the OnnxRuntime and limits
    (this runtime then owns and closes it); None for plain WASI only. Without it a module that
    imports wasi-nn fails to instantiate (INVALID_MODULE: unknown import).
    ``scratch_root``: where each run's scratch directory is made (None: the system's temporary
    directory).
    Thread-safe; ``close()`` is idempotent.
    """

    def __init__(
        self,
        *,
        cache_dir: Path | None = None,
        max_cached: int = 64,
        wasi_nn: WasiNn | Literal["auto"] | None = "auto",
        scratch_root: Path | None = None,
    ) -> None:
        if wasmtime is None:
            raise LocalRuntimeUnavailable(
                "WebAssembly needs wasmtime: pip install 'hearth-device-sdk[local]'"
            )
        config = wasmtime.Config()
        config.consume_fuel = True
        # Cranelift with default opts; parallel compilation would fight jobs for the cores.
        config.parallel_compilation = False
        self._engine = wasmtime.Engine(config)
        self._linker = wasmtime.Linker(self._engine)
        self._linker.define_wasi()
        # hearth.yield is a migration point (examples/wasm/hearth_migrate.h, docs/migration.md);
        # a plain run stays where it is, so here it returns at once and such modules run as is.
        self._linker.define_func("hearth", "yield", wasmtime.FuncType([], []), _stay)
        self._wasi_nn = WasiNn.if_available() if wasi_nn == "auto" else wasi_nn
        if self._wasi_nn is not None:
            self._wasi_nn.define(self._linker)
        # What ``run`` instantiates a module without /scratch from: the same imports, but the
        # guest's writes to stdout and stderr go straight from its memory into the run's
        # buffers (``_fd_write``). wasmtime's own custom-output streams call back into Python
        # for every 4 KiB, which made a 1 MiB answer cost twice its run. Hosts that use
        # ``linker`` are not affected.
        self._run_linker = wasmtime.Linker(self._engine)
        self._run_linker.define_wasi()
        self._run_linker.allow_shadowing = True
        i32 = wasmtime.ValType.i32()
        write_type = wasmtime.FuncType([i32] * 4, [i32])
        self._run_linker.define_func(_WASI, "fd_write", write_type, self._fd_write, True)
        self._run_linker.define_func("hearth", "yield", wasmtime.FuncType([], []), _stay)
        if self._wasi_nn is not None:
            self._wasi_nn.define(self._run_linker)
        self._local = threading.local()  # the run on this thread: its outputs
        self._cache_dir = cache_dir
        self._scratch_root = scratch_root
        if scratch_root is not None:
            scratch_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._idle_scratch: list[tuple[str, os.stat_result]] = []  # untouched, reusable
        self._max_cached = max_cached
        self._modules: OrderedDict[str, _Prepared] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        version = getattr(wasmtime, "__version__", "unknown")
        # "-bin": entries written before text modules were refused may hold a module that
        # wasmtime compiled from text; they are not read again.
        self._cache_tag = f"wasmtime-{version}-bin"

    # -- compilation -------------------------------------------------------------------------

    def load(self, sha256: str, wasm: bytes | None = None, path: Path | None = None) -> None:
        """Make ``sha256`` runnable. Bytes come from ``wasm`` or ``path`` and are checked
        against the hash before compiling (a tampered blob is refused, not run)."""
        self._module(sha256, wasm, path)

    def has(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._modules

    @property
    def engine(self) -> wasmtime.Engine:
        return self._engine

    @property
    def wasi_nn(self) -> WasiNn | None:
        """The wasi-nn host, if defined: hosts instantiating from ``linker`` themselves bind
        it to their store (``wasi_nn.bind(store)``) for the guest's calls to work."""
        return self._wasi_nn

    @property
    def linker(self) -> wasmtime.Linker:
        """The linker (WASI defined): hosts add their own imports here."""
        return self._linker

    def module(
        self, sha256: str, wasm: bytes | None = None, path: Path | None = None
    ) -> wasmtime.Module:
        """The compiled module for ``sha256`` (cached; bytes checked against the hash)."""
        return self._module(sha256, wasm, path).module

    def _module(self, sha256: str, wasm: bytes | None, path: Path | None) -> _Prepared:
        with self._lock:
            prepared = self._modules.get(sha256)
            if prepared is not None:
                self._modules.move_to_end(sha256)
                return prepared
        module = self._from_disk_cache(sha256)
        if module is None:
            wasm = verified_bytes(
                sha256, wasm, path, what="module", missing=ErrorCode.INVALID_MODULE
            )
            refuse_text(wasm)
            try:
                module = wasmtime.Module(self._engine, wasm)
            except wasmtime.WasmtimeError as exc:
                raise JobError(ErrorCode.INVALID_MODULE, _headline(exc)) from None
            self._to_disk_cache(sha256, module)
        prepared = self._prepare(module)
        with self._lock:
            self._modules[sha256] = prepared
            while len(self._modules) > self._max_cached:
                self._modules.popitem(last=False)
        return prepared

    def _prepare(self, module: wasmtime.Module) -> _Prepared:
        imports = [(i.module, i.name or "") for i in module.imports]
        scratch = any(m == _WASI and _reaches_directories(n) for m, n in imports)
        try:
            pre: wasmtime.InstancePre | None = self._linker_for(scratch).instantiate_pre(module)
        except wasmtime.WasmtimeError:
            pre = None  # an import we do not grant: each run reports it as it instantiates
        return _Prepared(
            module=module,
            pre=pre,
            nn=any(m == "wasi_ephemeral_nn" for m, _ in imports),
            scratch=scratch,
        )

    def _linker_for(self, scratch: bool) -> wasmtime.Linker:
        """A module with a /scratch writes its files through wasmtime's own fd_write, which
        cannot be called from ours (it needs its caller's memory): it gets the plain linker,
        and its stdout and stderr go through wasmtime's output callbacks."""
        return self._linker if scratch else self._run_linker

    def _cache_path(self, sha256: str) -> Path | None:
        if self._cache_dir is None:
            return None
        return self._cache_dir / f"{sha256}.{self._cache_tag}.cwasm"

    def _from_disk_cache(self, sha256: str) -> wasmtime.Module | None:
        path = self._cache_path(sha256)
        if path is None or not path.exists():
            return None
        try:
            # Only files this runtime wrote itself are deserialized: the cache directory is
            # private to the gateway (0700) and entries are keyed by hash and engine version.
            return wasmtime.Module.deserialize_file(self._engine, str(path))
        except wasmtime.WasmtimeError:
            log.warning("discarding unusable compiled-module cache entry %s", path.name)
            path.unlink(missing_ok=True)
            return None

    def _to_disk_cache(self, sha256: str, module: wasmtime.Module) -> None:
        path = self._cache_path(sha256)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(module.serialize())
            os.replace(tmp, path)
        except OSError:
            log.warning("could not write compiled-module cache entry %s", path.name)
            Path(tmp).unlink(missing_ok=True)

    # -- execution ---------------------------------------------------------------------------

    def run(
        self,
        sha256: str,
        *,
        args: list[str] | tuple[str, ...] = (),
        stdin: bytes = b"",
        limits: WasmLimits | None = None,
        wasm: bytes | None = None,
        path: Path | None = None,
    ) -> WasmOutcome:
        """Run a WASI command module to completion, with a fresh ``/scratch`` directory.
        Raises JobError with TRAP, TIMEOUT (fuel exhausted), MEMORY_LIMIT, OUTPUT_LIMIT (also
        for more than ``limits.scratch_bytes`` left in /scratch) or INVALID_MODULE."""
        if self._closed:
            raise JobError(ErrorCode.SHUTTING_DOWN, "runtime closed")
        limits = limits or WasmLimits()
        prepared = self._module(sha256, wasm, path)
        store = wasmtime.Store(self._engine)
        # This run's graphs and contexts; the ONNX sessions stay cached across runs. Only for
        # modules that import wasi-nn: binding costs a run that cannot use it.
        nn = self._wasi_nn.bind(store) if self._wasi_nn is not None and prepared.nn else None
        # Only a module that can reach a directory gets one (the untouched one of an earlier
        # run when there is one).
        scratch = self._take_scratch() if prepared.scratch else None
        budget = [limits.output_bytes]
        out, err = _Output(budget, store), _Output(budget, store)
        handles: list[int | None] = []
        try:
            store.set_fuel(limits.fuel)
            store.set_limits(memory_size=limits.memory_bytes)
            wasi = wasmtime.WasiConfig()
            wasi.argv = ["module", *args]
            if scratch is not None:
                wasi.preopen_dir(scratch[0], SCRATCH_GUEST_PATH)
                handles.append(_set_output(wasi, "stdout", out.write))
                handles.append(_set_output(wasi, "stderr", err.write))
            else:
                self._local.outputs = (out, err)
            with _stdin(wasi, stdin):
                store.set_wasi(wasi)
                exit_code = self._instantiate_and_start(store, prepared, limits, out, err)
            fuel_used = limits.fuel - store.get_fuel()
        finally:
            # Dropped now, on this thread, while Python is alive: a store left to the garbage
            # collector can be torn down by wasmtime's runtime threads at interpreter exit,
            # calling back into a finalizing Python and aborting the process.
            self._local.outputs = None
            if nn is not None:
                nn.close()
            store.close()
            _release_outputs(handles)
            # Checked afterwards rather than enforced while the run writes: cheap, and fuel and
            # the wall timeout bound how much a run can write meanwhile. A directory the run
            # did not touch holds nothing: no walk.
            over = scratch is not None and self._return_scratch(*scratch, limits.scratch_bytes)
        if over:
            raise JobError(ErrorCode.OUTPUT_LIMIT, f"/scratch over {limits.scratch_bytes} bytes")
        return WasmOutcome(exit_code, out.value(), err.value(), fuel_used)

    def _fd_write(
        self, caller: wasmtime.Caller, fd: int, iovs: int, count: int, written: int
    ) -> int:
        """WASI fd_write for modules without /scratch: stdout and stderr copied from the
        guest's memory into the run's buffers, one copy per call. Such a run has no other
        descriptor to write to (no preopens, no sockets)."""
        outputs = getattr(self._local, "outputs", None)
        if fd not in {1, 2} or outputs is None:
            return _WASI_EBADF
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            return _WASI_EBADF
        base = ctypes.addressof(memory.data_ptr(caller).contents)
        size = memory.data_len(caller)
        iovs, count, written = iovs & 0xFFFFFFFF, count & 0xFFFFFFFF, written & 0xFFFFFFFF
        if iovs + count * _IOVEC.size > size or written + _U32.size > size:
            return _WASI_EFAULT
        parts: list[bytes] = []
        for ptr, length in _IOVEC.iter_unpack(ctypes.string_at(base + iovs, count * _IOVEC.size)):
            if ptr + length > size:
                return _WASI_EFAULT
            if length:
                parts.append(ctypes.string_at(base + ptr, length))
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if outputs[fd - 1].write(data) < 0:
            return _WASI_EFBIG
        ctypes.memmove(base + written, _U32.pack(len(data)), _U32.size)
        return 0

    def _take_scratch(self) -> tuple[str, os.stat_result]:
        with self._lock:
            if self._idle_scratch:
                return self._idle_scratch.pop()
        # mkdtemp makes it 0700 with a name no other run shares.
        path = tempfile.mkdtemp(prefix="hearth-scratch-", dir=self._scratch_root)
        return path, os.stat(path)

    def _return_scratch(self, path: str, before: os.stat_result, limit: int) -> bool:
        """Keep a directory the run did not touch for the next run, remove any other; returns
        whether what the run left there was over ``limit`` bytes.

        Still empty with the same change and modification times, it cannot be told from a new
        one, and keeping it saves a mkdir and an rmdir per run: milliseconds on some disks,
        more than a small job takes. Whatever a run wrote goes with its directory."""
        try:
            after = os.stat(path)
            with os.scandir(path) as entries:
                empty = next(entries, None) is None
            untouched = empty and (after.st_ctime_ns, after.st_mtime_ns) == (
                before.st_ctime_ns,
                before.st_mtime_ns,
            )
        except OSError:
            untouched = False
        if untouched:
            with self._lock:
                if not self._closed:
                    self._idle_scratch.append((path, before))
                    return False
        over = not untouched and _tree_bytes(path) > limit
        remove_tree(path)
        return over

    def _instantiate_and_start(
        self,
        store: wasmtime.Store,
        prepared: _Prepared,
        limits: WasmLimits,
        out: _Output,
        err: _Output,
    ) -> int:
        instance = None
        try:
            if prepared.pre is not None:
                instance = prepared.pre.instantiate(store)
            else:
                linker = self._linker_for(prepared.scratch)
                instance = linker.instantiate(store, prepared.module)
            start = _export(store, instance, "_start")
            if not isinstance(start, wasmtime.Func):
                raise JobError(ErrorCode.INVALID_MODULE, "not a WASI command: no _start export")
            start(store)
            exit_code = 0
        except wasmtime.ExitTrap as exc:
            exit_code = exc.code
        except wasmtime.Trap as exc:
            raise self._classify_trap(exc, store, instance, limits, out=out, err=err) from None
        except wasmtime.WasmtimeError as exc:
            # Instantiation errors: unknown imports (asks for something we do not grant),
            # memory minimum above the limit.
            message = _headline(exc)
            code = ErrorCode.MEMORY_LIMIT if "memory" in message else ErrorCode.INVALID_MODULE
            raise JobError(code, message) from None
        if out.overflowed or err.overflowed:
            raise JobError(ErrorCode.OUTPUT_LIMIT, f"output over {limits.output_bytes} bytes")
        return exit_code

    @staticmethod
    def _classify_trap(
        exc: wasmtime.Trap,
        store: wasmtime.Store,
        instance: wasmtime.Instance | None,
        limits: WasmLimits,
        *,
        out: _Output,
        err: _Output,
    ) -> JobError:
        message = _root_cause(exc)
        if out.overflowed or err.overflowed:
            return JobError(ErrorCode.OUTPUT_LIMIT, f"output over {limits.output_bytes} bytes")
        if exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            return JobError(ErrorCode.TIMEOUT, f"fuel exhausted ({limits.fuel} units)")
        # A failed memory.grow returns -1 to the guest; most programs then abort. Report that
        # as the memory limit rather than as a generic trap when memory is at the ceiling.
        if instance is not None:
            memory = instance.exports(store).get("memory")
            if isinstance(memory, wasmtime.Memory):
                size = memory.data_len(store)
                if size + max(2 * 1024 * 1024, limits.memory_bytes // 16) > limits.memory_bytes:
                    return JobError(
                        ErrorCode.MEMORY_LIMIT, f"memory limit {limits.memory_bytes} bytes reached"
                    )
        return JobError(ErrorCode.TRAP, message)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._modules.clear()
            idle, self._idle_scratch = self._idle_scratch, []
        for path, _ in idle:
            remove_tree(path)
        if self._wasi_nn is not None:
            self._wasi_nn.close()


def _stay() -> None:
    """hearth.yield on a runtime that does not migrate runs: nothing to do."""


def _export(store: wasmtime.Store, instance: wasmtime.Instance, name: str) -> object:
    """One export of ``instance`` (None if absent), looked up alone: wasmtime-py's
    ``exports()`` wraps every export of the module first, a third of a small run's host time.
    Falls back to it where this wasmtime-py's internals differ."""
    try:
        from wasmtime import _bindings as ffi
        from wasmtime._extern import wrap_extern

        raw_instance = instance._instance
        context = store._context()
    except (ImportError, AttributeError):
        return instance.exports(store).get(name)
    item = ffi.wasmtime_extern_t()
    encoded = name.encode()
    found = ffi.wasmtime_instance_export_get(
        context, ctypes.byref(raw_instance), encoded, len(encoded), ctypes.byref(item)
    )
    return wrap_extern(item) if found else None


@contextlib.contextmanager
def _stdin(wasi: wasmtime.WasiConfig, data: bytes) -> Iterator[None]:
    """Give the run ``data`` as its stdin: copied once into wasmtime, where this wasmtime-py
    has the C API's ``wasi_config_set_stdin_bytes``, else through a temporary file (unlinked
    when the run ends). Without stdin, WASI reads see end-of-file."""
    if not data:
        yield
        return
    try:
        from wasmtime import _bindings as ffi

        set_bytes = ffi.wasi_config_set_stdin_bytes
        vec_new = ffi.wasm_byte_vec_new
    except (ImportError, AttributeError):
        with tempfile.NamedTemporaryFile(prefix="hearth-stdin-") as stdin_file:
            stdin_file.write(data)
            stdin_file.flush()
            wasi.stdin_file = stdin_file.name
            yield
        return
    vec = ffi.wasm_byte_vec_t()
    # wasm_byte_vec_new copies the bytes; the config then owns the vector (and frees it).
    vec_new(
        ctypes.byref(vec),
        len(data),
        ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ffi.wasm_byte_t)),
    )
    set_bytes(wasi.ptr(), ctypes.byref(vec))
    yield


def _set_output(wasi: wasmtime.WasiConfig, stream: str, callback: Any) -> int | None:
    """Route a WASI output stream to ``callback``, without a finalizer.

    wasmtime-py's own setter registers a Python finalizer that wasmtime calls when it drops the
    stream, which can happen on one of its runtime threads after the store is gone; at
    interpreter exit that call into a finalizing Python aborts the process ("panic in a
    function that cannot unwind"). We free the callback's handle ourselves after the run
    instead. Returns the handle, or None if this wasmtime-py has other internals (then its
    public setter is used).
    """
    try:
        from wasmtime import _bindings
        from wasmtime._wasi import CUSTOM_OUTPUTS, custom_call
    except ImportError:
        setattr(wasi, f"{stream}_custom", callback)
        return None
    raw = getattr(_bindings, f"_wasi_config_set_{stream}_custom", None)
    if raw is None:
        setattr(wasi, f"{stream}_custom", callback)
        return None
    handle = CUSTOM_OUTPUTS.allocate(callback)
    no_finalizer = raw.argtypes[3]()  # a NULL function pointer of the declared type
    raw(wasi.ptr(), custom_call, handle, no_finalizer)
    return int(handle)


def _release_outputs(handles: list[int | None]) -> None:
    try:
        from wasmtime._wasi import CUSTOM_OUTPUTS
    except ImportError:
        return
    for handle in handles:
        if handle is not None:
            CUSTOM_OUTPUTS.deallocate(handle)


def _tree_bytes(root: str) -> int:
    """Bytes in the regular files under ``root`` (symlinks not followed). A tree too deep to
    walk counts as over any limit: only a guest trying to wedge the host builds one."""
    total = 0
    try:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
    except RecursionError:
        return 1 << 62
    return total


def remove_tree(path: str | Path) -> None:
    """Remove a scratch tree whatever the guest put in it. shutil.rmtree recurses once per
    level, and a guest can nest directories deeper than Python's recursion limit through
    directory descriptors; rm has no such limit."""
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except (OSError, RecursionError):
        pass
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["rm", "-rf", "--", str(path)], check=False,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)  # fmt: skip
    if os.path.lexists(path):
        log.warning("could not remove scratch directory %s", path)


def refuse_text(wasm: bytes) -> None:
    """Modules are binary WebAssembly only (docs/protocol.md). wasmtime's Module() also
    compiles the text format (.wat), which a device's fallback runtime or another gateway need
    not accept: the same bytes must mean the same thing wherever they run, so text is refused
    before anything compiles it."""
    if not wasm.startswith(WASM_MAGIC):
        what = "WebAssembly text" if wasm.lstrip()[:1] == b"(" else "not WebAssembly"
        raise JobError(
            ErrorCode.INVALID_MODULE,
            f"{what}: modules are binary WebAssembly (starting with \\0asm)",
        )


def _headline(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _root_cause(exc: BaseException) -> str:
    """A trap's informative line: the root cause, which wasmtime prints after the backtrace."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
