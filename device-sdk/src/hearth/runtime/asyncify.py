"""Make an ordinary WASI command module migratable: Binaryen's Asyncify, plus exported globals.

Asyncify (``wasm-opt --asyncify``) rewrites a module so that, inside a call to one of the
listed imports, the host can *unwind* the whole WebAssembly call stack into a buffer in linear
memory and later *rewind* it, in the same instance or in a fresh one, on any machine. With the
WASI calls that a program makes anyway (``fd_read``, ``fd_write``, ``poll_oneoff``,
``sched_yield``) and ``hearth.yield`` (for long loops without I/O, see
examples/wasm/hearth_migrate.h) listed, every such call is a point where a run can stop on one
runtime and continue on another. The author changes nothing.

A run's complete state is then linear memory, the module's mutable globals and the host's WASI
state. Mutable globals (the C shadow-stack pointer among them) are usually not exported, so
the host could neither read nor restore them: :func:`export_globals` exports each one as
``hearth.global.N`` by editing the export section, which changes nothing else in the module.

The instrumented module is a new module with its own sha256; snapshots are bound to it.
Binaryen's output depends on its version, so a module is instrumented once (by the device or
the gateway that first sees it) and the instrumented bytes travel, never re-made elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from hearth.errors import ErrorCode, JobError

__all__ = [
    "GLOBAL_EXPORT_PREFIX",
    "MIGRATION_IMPORTS",
    "UNWIND_EXPORTS",
    "export_globals",
    "export_names",
    "instrument",
    "is_instrumented",
    "wasm_opt_path",
]

# The imports at which a run may stop: WASI's I/O and yield calls, and our own yield.
MIGRATION_IMPORTS = (
    ("wasi_snapshot_preview1", "fd_read"),
    ("wasi_snapshot_preview1", "fd_write"),
    ("wasi_snapshot_preview1", "poll_oneoff"),
    ("wasi_snapshot_preview1", "sched_yield"),
    ("hearth", "yield"),
)
UNWIND_EXPORTS = (
    "asyncify_start_unwind",
    "asyncify_stop_unwind",
    "asyncify_start_rewind",
    "asyncify_stop_rewind",
)
GLOBAL_EXPORT_PREFIX = "hearth.global."
# Features the toolchains we know emit by default (clang 16+, zig, rustc). Binaryen 108 refuses
# a module that uses one it was not told about, even with a target_features section.
_FEATURES = (
    "--enable-bulk-memory",
    "--enable-sign-ext",
    "--enable-mutable-globals",
    "--enable-nontrapping-float-to-int",
    "--enable-multivalue",
    "--enable-reference-types",
)
_INSTRUMENT_TIMEOUT_S = 120
_WASM_MAGIC = b"\0asm\x01\0\0\0"


def wasm_opt_path() -> str | None:
    """Binaryen's wasm-opt: ``$HEARTH_WASM_OPT``, else the one on PATH (Debian: binaryen)."""
    return os.environ.get("HEARTH_WASM_OPT") or shutil.which("wasm-opt")


def instrument(wasm: bytes) -> bytes:
    """The migratable form of a WASI command module: Asyncify at the migration imports,
    optimised again (-O2, which is what keeps the overhead small), globals exported.
    Raises JobError(INVALID_MODULE) for a module Binaryen cannot read, UNSUPPORTED when
    wasm-opt is not installed."""
    if not wasm.startswith(_WASM_MAGIC):
        raise JobError(ErrorCode.INVALID_MODULE, "not a binary WebAssembly module")
    tool = wasm_opt_path()
    if tool is None:
        raise JobError(
            ErrorCode.UNSUPPORTED,
            "migratable runs need Binaryen's wasm-opt (Debian: apt-get install binaryen)",
        )
    imports = ",".join(f"{module}.{name}" for module, name in MIGRATION_IMPORTS)
    with tempfile.TemporaryDirectory(prefix="hearth-asyncify-") as tmp:
        source, target = Path(tmp) / "in.wasm", Path(tmp) / "out.wasm"
        source.write_bytes(wasm)
        passes = ["--asyncify", f"--pass-arg=asyncify-imports@{imports}", "-O2"]
        argv = [tool, str(source), *_FEATURES, *passes, "-o", str(target)]
        try:
            done = subprocess.run(
                argv, capture_output=True, timeout=_INSTRUMENT_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise JobError(ErrorCode.INVALID_MODULE, "wasm-opt took too long") from None
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"exit status {done.returncode}"
            raise JobError(ErrorCode.INVALID_MODULE, f"cannot instrument: {why[:300]}")
        return export_globals(target.read_bytes())


def is_instrumented(export_names: set[str]) -> bool:
    return all(name in export_names for name in UNWIND_EXPORTS)


# -- a minimal reader and writer of the binary format's sections --------------------------


def _leb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def _uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _skip_name(data: bytes, pos: int) -> int:
    length, pos = _leb(data, pos)
    return pos + length


def _skip_limits(data: bytes, pos: int) -> int:
    flags = data[pos]
    _, pos = _leb(data, pos + 1)
    if flags & 1:
        _, pos = _leb(data, pos)
    return pos


def _skip_const_expr(data: bytes, pos: int) -> int:
    """Skip a constant expression up to and including its ``end``."""
    # Immediates of the constant instructions: -1 for one LEB128, else a byte count.
    immediates = {0x41: -1, 0x42: -1, 0x23: -1, 0xD2: -1, 0x43: 4, 0x44: 8, 0xD0: 1}
    while True:
        op = data[pos]
        pos += 1
        if op == 0x0B:
            return pos
        imm = immediates.get(op, 0)
        if imm < 0:
            _, pos = _leb(data, pos)
        else:
            pos += imm


def _sections(wasm: bytes) -> list[tuple[int, bytes]]:
    sections, pos = [], len(_WASM_MAGIC)
    while pos < len(wasm):
        section_id = wasm[pos]
        size, start = _leb(wasm, pos + 1)
        sections.append((section_id, wasm[start : start + size]))
        pos = start + size
    return sections


def _mutable_globals(sections: list[tuple[int, bytes]]) -> list[int]:
    imported = 0
    for section_id, body in sections:
        if section_id != 2:  # imports: globals imported come first in the index space
            continue
        count, pos = _leb(body, 0)
        for _ in range(count):
            pos = _skip_name(body, _skip_name(body, pos))
            kind = body[pos]
            pos += 1
            if kind == 0x00:
                _, pos = _leb(body, pos)
            elif kind == 0x01:
                pos = _skip_limits(body, pos + 1)
            elif kind == 0x02:
                pos = _skip_limits(body, pos)
            elif kind == 0x04:  # a tag (exception handling): attribute, type index
                _, pos = _leb(body, pos + 1)
            else:  # a global: value type, mutability
                imported += 1
                pos += 2
    mutable = []
    for section_id, body in sections:
        if section_id != 6:
            continue
        count, pos = _leb(body, 0)
        for i in range(count):
            if body[pos + 1] == 1:
                mutable.append(imported + i)
            pos = _skip_const_expr(body, pos + 2)
    return mutable


def export_globals(wasm: bytes) -> bytes:
    """``wasm`` with every mutable global it defines exported as ``hearth.global.N`` (N: its
    index), so a host can read and restore them. Idempotent."""
    sections = _sections(wasm)
    wanted = _mutable_globals(sections)
    entries: list[bytes] = []
    existing = b""
    count = 0
    for section_id, body in sections:
        if section_id == 7:
            count, pos = _leb(body, 0)
            existing = body[pos:]
    names = _export_names(existing, count)
    for index in wanted:
        name = f"{GLOBAL_EXPORT_PREFIX}{index}".encode()
        if name.decode() in names:
            continue
        entries.append(_uleb(len(name)) + name + b"\x03" + _uleb(index))
    if not entries:
        return wasm
    export_body = _uleb(count + len(entries)) + existing + b"".join(entries)
    out = bytearray(_WASM_MAGIC)
    placed = False
    for section_id, body in sections:
        content = body
        if section_id == 7:
            content, placed = export_body, True
        elif not placed and section_id in (8, 9, 12, 10, 11):
            # No export section yet: it goes right before start/elem/datacount/code/data.
            out += b"\x07" + _uleb(len(export_body)) + export_body
            placed = True
        out += bytes([section_id]) + _uleb(len(content)) + content
    if not placed:
        out += b"\x07" + _uleb(len(export_body)) + export_body
    return bytes(out)


def export_names(wasm: bytes) -> set[str]:
    """The names a binary module exports, read from its export section (nothing compiled).
    Raises JobError(INVALID_MODULE) for bytes that are not a binary module."""
    if not wasm.startswith(_WASM_MAGIC):
        raise JobError(ErrorCode.INVALID_MODULE, "not a binary WebAssembly module")
    try:
        for section_id, body in _sections(wasm):
            if section_id == 7:
                count, pos = _leb(body, 0)
                return _export_names(body[pos:], count)
    except IndexError:
        raise JobError(ErrorCode.INVALID_MODULE, "truncated WebAssembly module") from None
    return set()


def _export_names(body: bytes, count: int) -> set[str]:
    names, pos = set(), 0
    for _ in range(count):
        length, pos = _leb(body, pos)
        names.add(body[pos : pos + length].decode(errors="replace"))
        pos += length + 1
        _, pos = _leb(body, pos)
    return names
