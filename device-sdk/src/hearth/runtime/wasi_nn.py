"""wasi-nn for WebAssembly modules: the ``wasi_ephemeral_nn`` (witx, "preview1") ABI on ONNX.

A module keeps its pre- and post-processing in WebAssembly and hands the model to the host,
which runs it on the box's best execution provider (OnnxRuntime's provider preference and
fallback). The ABI is the one wasmtime's wasi-nn and the ``wasi-nn`` guest bindings (0.6 and
later) use, from WebAssembly/wasi-nn ``wasi-nn.witx``; every call returns an ``nn_errno``::

    load(builders_ptr, builders_len, encoding, target, graph_ptr)
    load_by_name(name_ptr, name_len, graph_ptr)             # no model registry: not_found
    init_execution_context(graph, context_ptr)
    set_input(context, index, tensor_ptr)
    compute(context)
    get_output(context, index, out_ptr, out_max_bytes, bytes_written_ptr)

Guest memory layouts (wasm32, little-endian): a graph builder is ``{ptr: u32, len: u32}``; a
tensor is 20 bytes: dimensions ``{ptr, len}`` of u32 at 0, type u8 at 8, data ``{ptr, len}``
at 12. Handles are u32 written to the out-pointers.

State lives per run (one wasmtime Store): ``WasiNn.bind(store)`` makes a fresh table of graphs
and contexts current on this thread, within limits (``NnLimits``), and drops it on close. The
sessions themselves stay cached in OnnxRuntime by the model's sha256, so the next run that
loads the same bytes skips session creation. Every failure reaches the guest as an errno; no
Python exception escapes into wasmtime (it would become a trap).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, cast

from hearth.errors import JobError
from hearth.protocol.messages import Dtype, Tensor
from hearth.runtime import installed

try:
    import wasmtime
except ImportError:  # pragma: no cover - exercised only without the `local` extra
    wasmtime = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from hearth.runtime.onnx import OnnxRuntime

__all__ = ["ENCODINGS", "TENSOR_TYPES", "NnErrno", "NnLimits", "WasiNn", "WasiNnBinding"]

log = logging.getLogger(__name__)

MODULE = "wasi_ephemeral_nn"


class NnErrno(IntEnum):
    """``nn_errno`` (witx ``enum (@witx tag u16)``), returned as the i32 result of every call."""

    SUCCESS = 0
    INVALID_ARGUMENT = 1  # bad pointer, handle, index, shape, dtype or tensor size
    INVALID_ENCODING = 2  # a graph encoding other than onnx or autodetect
    MISSING_MEMORY = 3  # the module exports no "memory"
    BUSY = 4  # this run's graph or context table is full
    RUNTIME_ERROR = 5  # onnxruntime failed (or the host did)
    UNSUPPORTED_OPERATION = 6  # called outside a run that has wasi-nn (e.g. a persistent task)
    TOO_LARGE = 7  # output bigger than the guest's buffer; model or tensor over the limits
    NOT_FOUND = 8  # load_by_name: there is no model registry


# witx ``tensor_type`` as of wasi-nn PR #54 (Aug 2023): f16, f32, f64, u8, i32, i64. Guests
# built against the older enum (f16, f32, u8, i32; wasi-nn bindings <= 0.5) agree on f32 only.
TENSOR_TYPES: dict[int, Dtype] = {
    0: "float16",
    1: "float32",
    2: "float64",
    3: "uint8",
    4: "int32",
    5: "int64",
}
_ITEMSIZE = {"float16": 2, "float32": 4, "float64": 8, "uint8": 1, "int32": 4, "int64": 8}

# witx ``graph_encoding``: openvino, onnx, tensorflow, pytorch, tensorflowlite, autodetect.
# ONNX Runtime is the only backend, so autodetect means "try it as ONNX".
ENCODINGS = {
    0: "openvino",
    1: "onnx",
    2: "tensorflow",
    3: "pytorch",
    4: "tensorflowlite",
    5: "autodetect",
}
_ACCEPTED_ENCODINGS = frozenset({1, 5})
# witx ``execution_target``: cpu, gpu, tpu. A hint only: the box's provider selection decides
# where a model runs, so the same module behaves the same on a laptop and on a CUDA gateway.
_TARGETS = frozenset({0, 1, 2})

_U32 = 0xFFFFFFFF
_TENSOR_BYTES = 20  # sizeof(tensor) in wasm32


@dataclass(frozen=True, slots=True)
class NnLimits:
    """What one run may ask of wasi-nn. Sizes in bytes."""

    max_graphs: int = 4
    max_contexts: int = 16
    max_model_bytes: int = 64 * 1024 * 1024
    max_tensor_bytes: int = 16 * 1024 * 1024  # one input or output
    max_rank: int = 8
    # Host time in load and compute is charged to the store's fuel at this rate, so a guest
    # looping over compute() cannot burn CPU far past its instruction budget (2e9 fuel is a
    # few seconds of WebAssembly on a home PC).
    fuel_per_second: int = 1_000_000_000


class _NnError(Exception):
    """Internal: the errno a host function returns, with a reason for the debug log."""

    def __init__(self, errno: NnErrno, reason: str) -> None:
        super().__init__(reason)
        self.errno = errno


@dataclass(frozen=True, slots=True)
class _Input:
    name: str
    dtype: str
    shape: tuple[int | None, ...]  # None: any size (a symbolic or unknown dimension)


@dataclass(frozen=True, slots=True)
class _Graph:
    sha256: str
    model: bytes  # kept for the run, in case OnnxRuntime's cache evicts the session meanwhile
    inputs: tuple[_Input, ...]


@dataclass(slots=True)
class _Context:
    graph: _Graph
    inputs: dict[int, Tensor] = field(default_factory=dict)
    outputs: list[bytes] | None = None


class WasiNnBinding:
    """One run's wasi-nn state, current on the thread that created it until ``close()``."""

    def __init__(self, owner: WasiNn, store: wasmtime.Store) -> None:
        self._owner = owner
        self.store = store
        self.graphs: list[_Graph] = []
        self.contexts: list[_Context] = []
        self._previous = owner._current()
        owner._local.binding = self
        self._closed = False

    def charge(self, seconds: float) -> None:
        """Take host time out of the guest's fuel; at zero the guest traps (reported as the
        run's timeout) at its next instruction."""
        cost = int(seconds * self._owner.limits.fuel_per_second)
        if cost <= 0:
            return
        # A store without fuel metering has nothing to charge.
        with contextlib.suppress(wasmtime.WasmtimeError):
            self.store.set_fuel(max(0, self.store.get_fuel() - cost))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.graphs.clear()
        self.contexts.clear()
        if self._owner._current() is self:
            self._owner._local.binding = self._previous

    def __enter__(self) -> WasiNnBinding:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class WasiNn:
    """The ``wasi_ephemeral_nn`` host functions, backed by an OnnxRuntime.

    ``onnx`` is a runtime to share (not closed here), or a factory called on first ``load``
    (its runtime is owned and closed here); None: ``OnnxRuntime()`` on first use. So defining
    wasi-nn costs nothing until a module actually loads a model.

    Usage: ``WasmRuntime(wasi_nn=WasiNn(onnx_runtime, limits=NnLimits(max_graphs=1)))``; the
    WasmRuntime binds it to each run's store. Hosts that instantiate modules themselves call
    ``bind(store)`` around the guest's execution.
    """

    def __init__(
        self,
        onnx: OnnxRuntime | Callable[[], OnnxRuntime] | None = None,
        *,
        limits: NnLimits | None = None,
    ) -> None:
        self.limits = limits or NnLimits()
        self._factory: Callable[[], OnnxRuntime] | None
        self._onnx: OnnxRuntime | None
        if onnx is None or callable(onnx):
            self._factory, self._onnx, self._owned = onnx or _default_onnx, None, True
        else:
            self._factory, self._onnx, self._owned = None, onnx, False
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = False

    @classmethod
    def if_available(
        cls,
        onnx: OnnxRuntime | Callable[[], OnnxRuntime] | None = None,
        *,
        limits: NnLimits | None = None,
    ) -> WasiNn | None:
        """A WasiNn where onnxruntime and numpy are installed (checked without importing them),
        else None: a device without them still runs plain WASI modules."""
        if not all(installed(name) for name in ("onnxruntime", "numpy")):
            return None
        return cls(onnx, limits=limits)

    def define(self, linker: wasmtime.Linker) -> None:
        """Add the ``wasi_ephemeral_nn`` imports to ``linker``."""
        functions: dict[str, tuple[int, Callable[..., int]]] = {
            "load": (5, self._load),
            "load_by_name": (3, self._load_by_name),
            "init_execution_context": (2, self._init_execution_context),
            "set_input": (3, self._set_input),
            "compute": (1, self._compute),
            "get_output": (5, self._get_output),
        }
        i32 = wasmtime.ValType.i32()
        for name, (arity, fn) in functions.items():
            linker.define_func(MODULE, name, wasmtime.FuncType([i32] * arity, [i32]),
                               _guarded(name, fn), access_caller=True)  # fmt: skip

    def bind(self, store: wasmtime.Store) -> WasiNnBinding:
        """Start a run's state for ``store`` on this thread; ``close()`` it when the run ends.
        Host calls run on the thread that called into the guest, so a thread-local finds it."""
        return WasiNnBinding(self, store)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            onnx, self._onnx = self._onnx, None
        if onnx is not None and self._owned:
            onnx.close()

    # -- state -------------------------------------------------------------------------------

    def _current(self) -> WasiNnBinding | None:
        return cast("WasiNnBinding | None", getattr(self._local, "binding", None))

    def _binding(self) -> WasiNnBinding:
        binding = self._current()
        if binding is None:
            raise _NnError(NnErrno.UNSUPPORTED_OPERATION, "wasi-nn is not bound to this run")
        return binding

    def _runtime(self) -> OnnxRuntime:
        with self._lock:
            if self._closed:
                raise _NnError(NnErrno.BUSY, "runtime closed")
            if self._onnx is None:
                assert self._factory is not None
                # LocalRuntimeUnavailable (no onnxruntime after all) ends as runtime_error.
                self._onnx = self._factory()
            return self._onnx

    @staticmethod
    def _context(binding: WasiNnBinding, handle: int) -> _Context:
        handle &= _U32
        if handle >= len(binding.contexts):
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"no execution context {handle}")
        return binding.contexts[handle]

    # -- host functions ----------------------------------------------------------------------

    def _load(  # noqa: PLR0917  the guest's import, called with the ABI's arguments
        self,
        caller: wasmtime.Caller,
        builders_ptr: int,
        builders_len: int,
        encoding: int,
        target: int,
        graph_ptr: int,
    ) -> int:
        binding = self._binding()
        guest = _Guest(caller)
        guest.check(graph_ptr, 4)
        if encoding not in _ACCEPTED_ENCODINGS:
            name = ENCODINGS.get(encoding, str(encoding))
            raise _NnError(NnErrno.INVALID_ENCODING, f"encoding {name}: only onnx is supported")
        if target not in _TARGETS:
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"execution target {target}")
        builders_len &= _U32
        if builders_len != 1:
            # ONNX is one buffer; more would be another backend's layout (OpenVINO: xml + bin).
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"{builders_len} builders, onnx takes 1")
        model_ptr, model_len = guest.u32s(builders_ptr, 2)
        if model_len > self.limits.max_model_bytes:
            raise _NnError(NnErrno.TOO_LARGE, f"model of {model_len} bytes")
        if model_len == 0:
            raise _NnError(NnErrno.INVALID_ARGUMENT, "empty model")
        model = guest.read(model_ptr, model_len)
        if len(binding.graphs) >= self.limits.max_graphs:
            raise _NnError(NnErrno.BUSY, f"{self.limits.max_graphs} graphs already loaded")
        sha256 = hashlib.sha256(model).hexdigest()
        onnx = self._runtime()
        started = time.perf_counter()
        try:
            inputs = _inputs(onnx, sha256, model)
        except JobError as exc:  # INVALID_MODEL: onnxruntime refused the bytes
            raise _NnError(NnErrno.INVALID_ARGUMENT, exc.message) from None
        finally:
            binding.charge(time.perf_counter() - started)
        binding.graphs.append(_Graph(sha256, model, inputs))
        guest.write_u32(graph_ptr, len(binding.graphs) - 1)
        return NnErrno.SUCCESS

    def _load_by_name(
        self, caller: wasmtime.Caller, name_ptr: int, name_len: int, graph_ptr: int
    ) -> int:
        self._binding()
        guest = _Guest(caller)
        guest.check(name_ptr, name_len)
        guest.check(graph_ptr, 4)
        raise _NnError(NnErrno.NOT_FOUND, "no model registry: pass the model's bytes to load")

    def _init_execution_context(self, caller: wasmtime.Caller, graph: int, context_ptr: int) -> int:
        binding = self._binding()
        guest = _Guest(caller)
        guest.check(context_ptr, 4)
        graph &= _U32
        if graph >= len(binding.graphs):
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"no graph {graph}")
        if len(binding.contexts) >= self.limits.max_contexts:
            raise _NnError(NnErrno.BUSY, f"{self.limits.max_contexts} contexts already")
        binding.contexts.append(_Context(binding.graphs[graph]))
        guest.write_u32(context_ptr, len(binding.contexts) - 1)
        return NnErrno.SUCCESS

    def _set_input(self, caller: wasmtime.Caller, context: int, index: int, tensor_ptr: int) -> int:
        ctx = self._context(self._binding(), context)
        guest = _Guest(caller)
        raw = guest.read(tensor_ptr, _TENSOR_BYTES)
        dims_ptr, rank = struct.unpack_from("<II", raw, 0)
        # Only the tag byte: the three bytes after it are padding, which guests need not zero.
        type_tag = raw[8]
        data_ptr, data_len = struct.unpack_from("<II", raw, 12)
        index &= _U32
        if index >= len(ctx.graph.inputs):
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"no input {index}")
        spec = ctx.graph.inputs[index]
        if rank > self.limits.max_rank:
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"rank {rank}")
        shape = guest.u32s(dims_ptr, rank)
        dtype = TENSOR_TYPES.get(type_tag)
        if dtype is None:
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"tensor type {type_tag}")
        if dtype != spec.dtype:
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"input {index} is {spec.dtype}, not {dtype}")
        if len(shape) != len(spec.shape) or any(
            want is not None and want != got for want, got in zip(spec.shape, shape, strict=True)
        ):
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"input {index} shape {list(shape)}")
        expected = math.prod(shape) * _ITEMSIZE[dtype]
        if data_len > self.limits.max_tensor_bytes or expected > self.limits.max_tensor_bytes:
            raise _NnError(NnErrno.TOO_LARGE, f"input of {max(data_len, expected)} bytes")
        if data_len != expected:
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"{data_len} bytes, shape needs {expected}")
        data = guest.read(data_ptr, data_len)
        ctx.inputs[index] = Tensor(name=spec.name, dtype=dtype, shape=list(shape), data=data)
        return NnErrno.SUCCESS

    def _compute(self, _caller: wasmtime.Caller, context: int) -> int:
        binding = self._binding()
        ctx = self._context(binding, context)
        graph = ctx.graph
        missing = [i for i in range(len(graph.inputs)) if i not in ctx.inputs]
        if missing:
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"inputs {missing} not set")
        onnx = self._runtime()
        started = time.perf_counter()
        try:
            tensors, provider = onnx.run(graph.sha256, list(ctx.inputs.values()), model=graph.model)
        except JobError as exc:
            raise _NnError(NnErrno.RUNTIME_ERROR, exc.message) from None
        finally:
            binding.charge(time.perf_counter() - started)
        log.debug("wasi-nn compute of %s on %s", graph.sha256[:12], provider)
        largest = max((len(t.data) for t in tensors), default=0)
        if largest > self.limits.max_tensor_bytes:
            ctx.outputs = None
            raise _NnError(NnErrno.TOO_LARGE, f"output of {largest} bytes")
        ctx.outputs = [t.data for t in tensors]
        return NnErrno.SUCCESS

    def _get_output(  # noqa: PLR0917  the guest's import, called with the ABI's arguments
        self,
        caller: wasmtime.Caller,
        context: int,
        index: int,
        out_ptr: int,
        out_max: int,
        written_ptr: int,
    ) -> int:
        ctx = self._context(self._binding(), context)
        guest = _Guest(caller)
        # The whole declared buffer must be the guest's, not just the part this output fills.
        guest.check(out_ptr, out_max)
        guest.check(written_ptr, 4)
        if ctx.outputs is None:
            raise _NnError(NnErrno.INVALID_ARGUMENT, "no outputs: call compute first")
        index &= _U32
        if index >= len(ctx.outputs):
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"no output {index}")
        data = ctx.outputs[index]
        if len(data) > (out_max & _U32):
            raise _NnError(NnErrno.TOO_LARGE, f"output {index} is {len(data)} bytes")
        guest.write(out_ptr, data)
        guest.write_u32(written_ptr, len(data))
        return NnErrno.SUCCESS


class _Guest:
    """Bounds-checked access to the calling instance's exported memory. Pointers and lengths
    arrive as signed i32 and are read as the u32 they are."""

    def __init__(self, caller: wasmtime.Caller) -> None:
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            raise _NnError(NnErrno.MISSING_MEMORY, "the module exports no memory")
        self._caller = caller
        self._memory = memory
        self._size = memory.data_len(caller)

    def check(self, ptr: int, length: int) -> int:
        ptr, length = ptr & _U32, length & _U32
        # Python ints do not wrap: ptr + length past 4 GiB is simply out of bounds.
        if ptr + length > self._size:
            raise _NnError(NnErrno.INVALID_ARGUMENT, f"[{ptr}, +{length}) outside memory")
        return ptr

    def read(self, ptr: int, length: int) -> bytes:
        start = self.check(ptr, length)
        return bytes(self._memory.read(self._caller, start, start + (length & _U32)))

    def u32s(self, ptr: int, count: int) -> tuple[int, ...]:
        return struct.unpack(f"<{count}I", self.read(ptr, 4 * count))

    def write(self, ptr: int, data: bytes) -> None:
        self._memory.write(self._caller, data, self.check(ptr, len(data)))

    def write_u32(self, ptr: int, value: int) -> None:
        self.write(ptr, struct.pack("<I", value))


def _inputs(onnx: OnnxRuntime, sha256: str, model: bytes) -> tuple[_Input, ...]:
    """Load the model (cached by hash) and return its inputs in order.

    wasi-nn addresses tensors by index: inputs in the order of ``session.get_inputs()``
    (OnnxRuntime keeps that, with dtypes and shapes, for its own checks); outputs in the order
    ``OnnxRuntime.run`` returns them, that of ``session.get_outputs()``.
    """
    return tuple(
        _Input(name, dtype, tuple(d if isinstance(d, int) and d >= 0 else None for d in shape))
        for name, dtype, shape in onnx.input_specs(sha256, model=model)
    )


def _default_onnx() -> OnnxRuntime:
    from hearth.runtime.onnx import OnnxRuntime

    return OnnxRuntime()


class _PeerLog:
    """At most one warning per interval for what a guest can trigger, with a suppressed count."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self._interval_s = interval_s
        self._last = -interval_s
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, fmt: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self._interval_s:
                self._suppressed += 1
                return
            self._last, suppressed, self._suppressed = now, self._suppressed, 0
        if suppressed:
            fmt += " (%d similar suppressed)"
            args = (*args, suppressed)
        log.warning(fmt, *args)


_peer_log = _PeerLog()


def _guarded(name: str, fn: Callable[..., int]) -> Callable[..., int]:
    """Wrap a host function so that whatever happens the guest gets an errno: an exception
    escaping into wasmtime would trap the guest (and a bug here must not crash a worker)."""

    def call(caller: wasmtime.Caller, *args: Any) -> int:
        try:
            return int(fn(caller, *args))
        except _NnError as exc:
            log.debug("wasi-nn %s: %s: %s", name, exc.errno.name.lower(), exc)
            return int(exc.errno)
        except Exception as exc:  # noqa: BLE001 - the guest sees runtime_error, never a trap
            _peer_log.warning("wasi-nn %s failed: %s: %s", name, type(exc).__name__,
                              str(exc)[:200])  # fmt: skip
            return int(NnErrno.RUNTIME_ERROR)

    return call
