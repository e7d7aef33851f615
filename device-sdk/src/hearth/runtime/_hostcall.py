"""Host functions that cost a ctypes call, not a wasmtime-py trampoline.

wasmtime-py's ``Linker.define_func`` wraps every call in a generic trampoline that builds a
``Val`` (and two ``ValType`` objects) per argument and checks the result's type by value: ~30 µs
a call on a busy home PC, where the work a WASI call does is a microsecond or two. A program
that reads its input a few KiB at a time spends more time there than computing. The Python
WASI host of migratable runs (hearth.runtime.wasi_host) therefore defines its functions through
wasmtime's C API directly (``wasmtime_linker_define_func_unchecked``: raw 64-bit slots in, raw
slots out), which is what wasmtime-py's generated bindings expose: ~2 µs a call.

Arguments arrive as Python ints: i32 as unsigned (WASI passes addresses, sizes, descriptors and
flags there), i64 as signed (``fd_seek``'s offset is the one that can be negative). A Python
exception in a host function becomes a trap, and ``on_error`` receives it first, so that the
caller of the WebAssembly function can raise it again (proc_exit's Exit, the output limit).
The ``wasmtime.Caller`` of the call in progress (to call the guest's own exports, or to ask the
size of its memory) is made only when a host function asks for it (:func:`caller`).

Where this wasmtime-py lacks those bindings, :func:`define` returns False and the caller
defines the function the ordinary way.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["caller", "define", "inside"]

_UNCHECKED: Any = None
try:
    import wasmtime
    from wasmtime import _bindings as _ffi

    _UNCHECKED = _ffi.wasmtime_func_unchecked_callback_t
    _define_unchecked = _ffi.wasmtime_linker_define_func_unchecked
    _trap_new = _ffi.wasmtime_trap_new
    _NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()
except (ImportError, AttributeError):  # pragma: no cover - another wasmtime-py
    pass

_TRAP_MESSAGE = b"hearth host function raised"
_U32 = 0xFFFFFFFF
# The arguments of all-i32 signatures, unrolled: most WASI calls, fd_read and fd_write among
# them, and the hottest code here (a loop over the slots costs twice as much).
_READ_I32: tuple[Callable[[Any], tuple[int, ...]], ...] = (
    lambda s: (),
    lambda s: (s[0].i32 & _U32,),
    lambda s: (s[0].i32 & _U32, s[1].i32 & _U32),
    lambda s: (s[0].i32 & _U32, s[1].i32 & _U32, s[2].i32 & _U32),
    lambda s: (s[0].i32 & _U32, s[1].i32 & _U32, s[2].i32 & _U32, s[3].i32 & _U32),
    lambda s: (s[0].i32 & _U32, s[1].i32 & _U32, s[2].i32 & _U32, s[3].i32 & _U32, s[4].i32 & _U32),
)


class _Call(threading.local):
    raw: Any = None  # the wasmtime_caller_t* of the host call in progress on this thread
    caller: Any = None  # its wasmtime.Caller, once asked for


_call = _Call()


def caller() -> Any:
    """The ``wasmtime.Caller`` of the host call in progress on this thread (valid until that
    call returns)."""
    made = _call.caller
    if made is None:
        if _call.raw is None:
            raise RuntimeError("no host call in progress")
        made = _call.caller = wasmtime.Caller(_call.raw)
    return made


@contextlib.contextmanager
def inside(the_caller: Any) -> Iterator[None]:
    """A host call made through wasmtime-py's own trampoline (which passes its Caller)."""
    saved = _call.raw, _call.caller
    _call.raw, _call.caller = object(), the_caller
    try:
        yield
    finally:
        _call.raw, _call.caller = saved


def define(
    linker: Any,
    module: str,
    name: str,
    *,
    params: str,
    result: bool,
    call: Callable[..., int | None],
    on_error: Callable[[BaseException], None],
    keep: list[object],
) -> bool:
    """Define ``module.name`` in ``linker``: ``params`` one letter per parameter ("i" i32,
    "I" i64), ``result`` one i32 or none. ``keep`` holds the callback for as long as the
    linker lives."""
    if _UNCHECKED is None:  # pragma: no cover
        return False
    wide = tuple(p == "I" for p in params)
    read = _READ_I32[len(params)] if not any(wide) and len(params) < len(_READ_I32) else None

    def read_any(slots: Any) -> list[int]:
        return [slots[i].i64 if w else slots[i].i32 & _U32 for i, w in enumerate(wide)]

    read_args = read or read_any

    def callback(_env: Any, caller_ptr: Any, slots: Any, _count: int) -> int:
        # Host calls do not nest (none calls back into code that makes one), so no saving.
        _call.raw = caller_ptr
        try:
            value = call(*read_args(slots))
            if result:
                slots[0].i32 = value
            return 0
        except BaseException as exc:  # noqa: BLE001 - handed on: it ends the call as a trap
            on_error(exc)
            trap = _trap_new(_TRAP_MESSAGE, len(_TRAP_MESSAGE))
            return ctypes.cast(trap, ctypes.c_void_p).value or 0
        finally:
            made = _call.caller
            if made is not None:
                made._invalidate()  # as wasmtime-py's own trampoline does
                _call.caller = None
            _call.raw = None

    raw = _UNCHECKED(callback)
    keep.append(raw)
    i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
    ty = wasmtime.FuncType([i64 if w else i32 for w in wide], [i32] if result else [])
    keep.append(ty)
    module_bytes, name_bytes = module.encode(), name.encode()
    error = _define_unchecked(
        linker.ptr(),
        ctypes.create_string_buffer(module_bytes),
        len(module_bytes),
        ctypes.create_string_buffer(name_bytes),
        len(name_bytes),
        ty.ptr(),
        raw,
        None,
        _NO_FINALIZER,
    )
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)
    return True
