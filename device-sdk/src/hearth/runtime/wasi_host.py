"""WASI preview 1 in Python, for migratable runs: every bit of state is ours to capture.

wasmtime's own WASI keeps its state (how much stdin was read, open files, clocks) in native
code where no snapshot can reach it. A migratable run therefore gets this host instead: the
same sandbox as ``hearth.runtime.wasm`` (args, an empty environment, stdin, stdout and
stderr, one ``/scratch`` directory and nothing else, no sockets), with all of its state in one
:class:`WasiState` that a snapshot carries. ``/scratch`` lives in memory here, so its files
travel with the run.

Calls outside that sandbox (sockets, links, anything of another directory) answer ``ENOSYS``
or ``ENOTCAPABLE`` as wasmtime's WASI would for a module granted nothing.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
import time
from collections.abc import Callable

import msgspec

__all__ = [
    "SCRATCH_FD",
    "Errno",
    "Exit",
    "GuestFault",
    "OpenFile",
    "OutputLimit",
    "WasiHost",
    "WasiState",
]

SCRATCH_FD = 3
_SCRATCH = "/scratch"


class Errno:
    """The WASI errno values this host returns."""

    SUCCESS = 0
    ACCES = 2
    BADF = 8
    EXIST = 20
    FBIG = 22
    INVAL = 28
    ISDIR = 31
    NOENT = 44
    NOSYS = 52
    NOTDIR = 54
    NOTEMPTY = 55
    SPIPE = 70
    NOTCAPABLE = 76


class Exit(Exception):
    """proc_exit: unwinds the wasm stack to the host with the exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class GuestFault(Exception):
    """A WASI call gave an address range outside the guest's memory: the run traps (reading
    there would be reading the host's own address space)."""

    def __init__(self, ptr: int, size: int) -> None:
        super().__init__(f"a WASI call's buffer [{ptr}, {ptr + size}) is outside memory")


class OutputLimit(Exception):
    """stdout and stderr went past their budget: the run stops here (the error is the host's,
    so a guest that ignores failed writes cannot spin on them until its fuel runs out)."""


class OpenFile(msgspec.Struct, array_like=True):
    path: str  # relative to /scratch; "" is /scratch itself
    offset: int = 0
    append: bool = False
    directory: bool = False


class WasiState(msgspec.Struct, kw_only=True):
    """Everything WASI knows about a run; carried whole in a snapshot (docs/migration.md)."""

    args: list[str]
    stdin: bytes = b""
    stdin_offset: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    output_budget: int = 8 * 1024 * 1024  # stdout + stderr still allowed
    output_overflowed: bool = False
    # Contents of the files in /scratch by path (bytearray: appends cost what they append).
    files: dict[str, bytearray] = {}
    dirs: list[str] = []
    fds: dict[int, OpenFile] = {}
    next_fd: int = SCRATCH_FD + 1
    # Monotonic time seen by the guest (ns): it never goes back, wherever the run moves.
    monotonic_ns: int = 0


_FILETYPE_CHAR, _FILETYPE_DIR, _FILETYPE_FILE = 2, 3, 4
_RIGHTS_ALL = (1 << 30) - 1
_O_CREAT, _O_DIRECTORY, _O_EXCL, _O_TRUNC = 1, 2, 4, 8
_FDFLAG_APPEND = 1
_CLOCK_REALTIME, _CLOCK_MONOTONIC = 0, 1
_EVENTTYPE_CLOCK = 0
_SUBCLOCK_ABSTIME = 1
_SUBSCRIPTION_BYTES, _EVENT_BYTES = 48, 32
_MAX_SLEEP_S = 60.0
_U32 = struct.Struct("<I")


def _norm(path: str) -> str | None:
    """A guest path relative to /scratch, or None for one that leaves it."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


class WasiHost:
    """The WASI functions of one run, over its :class:`WasiState`.

    ``memory`` is bound per instance (:meth:`bind`); ``at_migration_point`` is called at each
    call that Asyncify may unwind (fd_read, fd_write, poll_oneoff, sched_yield, hearth.yield)
    before the call does anything: it may unwind the stack (the call is then made again,
    from the start, when the run is rewound)."""

    def __init__(self, state: WasiState) -> None:
        self.state = state
        self._base = 0
        self._size = 0
        self._mem = memoryview(b"")
        self.memory_size: Callable[[], int] = lambda: self._size
        self._monotonic_origin = time.monotonic_ns() - state.monotonic_ns
        self.at_migration_point: Callable[[], bool] = lambda: False
        # Set to end a sleep early (a pause is waiting for this run's next migration point).
        self.wake = threading.Event()
        self._stdout = bytearray(state.stdout)
        self._stderr = bytearray(state.stderr)
        self.dirty_fs = False
        # Progress, for checkpoints by MiB (docs/migration.md §6): bytes the guest has read
        # (stdin, /scratch) and written (stdout, stderr, /scratch) on this host.
        self.progress_bytes = 0

    # -- memory --------------------------------------------------------------------------

    def bind(self, base: int, size: int, memory_size: Callable[[], int]) -> None:
        """Linear memory: its address (stable for the instance's life: wasmtime reserves the
        whole 4 GiB range up front, so growth never moves it), its size now, and how to learn
        its size later (it grows while the guest runs; called from within a host call)."""
        self._base = base
        self.memory_size = memory_size
        self._map(size)

    def unbind(self) -> None:
        """The instance is going away: no view of its memory may outlive it."""
        self._mem.release()
        self._mem, self._size = memoryview(b""), 0

    def _map(self, size: int) -> None:
        self._size = size
        view = (ctypes.c_uint8 * size).from_address(self._base) if size else bytearray()
        self._mem = memoryview(view).cast("B")

    @property
    def base(self) -> int:
        return self._base

    @property
    def known_size(self) -> int:
        """The memory size this host last learnt (at most the real one: memory only grows)."""
        return self._size

    def _view(self, ptr: int, size: int) -> memoryview:
        """Guest memory, checked to hold [ptr, ptr + size): past its end lie the guard pages of
        wasmtime's reservation, and touching them would kill the process."""
        if ptr + size > self._size:
            self._map(self.memory_size())  # memory only grows: the cached size is a floor
            if ptr + size > self._size:
                raise GuestFault(ptr, size)
        return self._mem

    def _read(self, ptr: int, size: int) -> bytes:
        return self._view(ptr, size)[ptr : ptr + size].tobytes()

    def _write(self, ptr: int, data: bytes | memoryview) -> None:
        self._view(ptr, len(data))[ptr : ptr + len(data)] = data

    def _put(self, fmt: str, ptr: int, *values: int) -> None:
        struct.pack_into(fmt, self._view(ptr, struct.calcsize(fmt)), ptr, *values)

    def _put_u32(self, ptr: int, value: int) -> None:
        _U32.pack_into(self._view(ptr, 4), ptr, value)

    def _iovecs(self, iovs: int, count: int) -> list[tuple[int, int]]:
        words = struct.unpack_from(f"<{2 * count}I", self._view(iovs, 8 * count), iovs)
        return [(words[i], words[i + 1]) for i in range(0, 2 * count, 2)]

    def sync_state(self) -> WasiState:
        """The state with everything buffered written back (for a snapshot). Consumed stdin
        is dropped: a snapshot carries only what the program has yet to read."""
        self.state.stdin = self.state.stdin[self.state.stdin_offset :]
        self.state.stdin_offset = 0
        self.state.stdout = bytes(self._stdout)
        self.state.stderr = bytes(self._stderr)
        self.state.monotonic_ns = time.monotonic_ns() - self._monotonic_origin
        return self.state

    @property
    def stdout(self) -> bytes:
        return bytes(self._stdout)

    @property
    def stderr(self) -> bytes:
        return bytes(self._stderr)

    # -- args, environment, clocks, random -----------------------------------------------

    def args_sizes_get(self, argc_ptr: int, size_ptr: int) -> int:
        encoded = [a.encode() + b"\0" for a in self.state.args]
        self._put("<I", argc_ptr, len(encoded))
        self._put("<I", size_ptr, sum(map(len, encoded)))
        return Errno.SUCCESS

    def args_get(self, argv: int, buf: int) -> int:
        for i, arg in enumerate(self.state.args):
            data = arg.encode() + b"\0"
            self._put("<I", argv + 4 * i, buf)
            self._write(buf, data)
            buf += len(data)
        return Errno.SUCCESS

    def environ_sizes_get(self, count_ptr: int, size_ptr: int) -> int:
        self._put("<II", count_ptr, 0, 0)
        self._put("<I", size_ptr, 0)
        return Errno.SUCCESS

    def environ_get(self, _environ: int, _buf: int) -> int:
        return Errno.SUCCESS

    def clock_res_get(self, clock: int, res_ptr: int) -> int:
        if clock not in (_CLOCK_REALTIME, _CLOCK_MONOTONIC):
            return Errno.INVAL
        self._put("<Q", res_ptr, 1000)
        return Errno.SUCCESS

    def clock_time_get(self, clock: int, _precision: int, time_ptr: int) -> int:
        if clock == _CLOCK_REALTIME:
            now = time.time_ns()
        elif clock == _CLOCK_MONOTONIC:
            now = time.monotonic_ns() - self._monotonic_origin
        else:
            return Errno.INVAL
        self._put("<Q", time_ptr, now)
        return Errno.SUCCESS

    def random_get(self, buf: int, size: int) -> int:
        self._view(buf, size)  # before making that many bytes
        self._write(buf, os.urandom(size))
        return Errno.SUCCESS

    def proc_exit(self, code: int) -> None:
        raise Exit(code)

    def sched_yield(self) -> int:
        self.at_migration_point()
        return Errno.SUCCESS

    def hearth_yield(self) -> None:
        self.at_migration_point()

    def _now(self, clock: int) -> int:
        if clock == _CLOCK_REALTIME:
            return time.time_ns()
        return time.monotonic_ns() - self._monotonic_origin

    def poll_oneoff(self, subs: int, events: int, count: int, nevents: int) -> int:
        if self.at_migration_point():
            return Errno.SUCCESS
        if count == 0:
            return Errno.INVAL
        # Clock subscriptions sleep (the shortest one wins); fd subscriptions are always ready.
        raw = self._read(subs, _SUBSCRIPTION_BYTES * count)
        out, sleep_ns, clocks = [], 0, 0
        for i in range(count):
            at = _SUBSCRIPTION_BYTES * i
            userdata, tag = struct.unpack_from("<QB", raw, at)
            if tag == _EVENTTYPE_CLOCK:
                # subscription_clock at offset 16: id u32, timeout u64, precision u64, flags u16
                clock, timeout, _precision, flags = struct.unpack_from("<I4xQQH", raw, at + 16)
                if flags & _SUBCLOCK_ABSTIME:
                    timeout = max(0, timeout - self._now(clock))
                sleep_ns = timeout if not clocks else min(sleep_ns, timeout)
                clocks += 1
            out.append(struct.pack("<QHB5xQH6x", userdata, 0, tag, 0, 0))
        # A pause cuts a sleep short and unwinds; the call is made again, whole, where the run
        # resumes (a relative sleep then starts over: programs oversleep, never undersleep).
        if (
            clocks == count
            and sleep_ns
            and self.wake.wait(min(sleep_ns / 1e9, _MAX_SLEEP_S))
            and self.at_migration_point()
        ):
            return Errno.SUCCESS
        for i, event in enumerate(out):
            self._write(events + _EVENT_BYTES * i, event)
        self._put("<I", nevents, len(out))
        return Errno.SUCCESS

    # -- file descriptors ----------------------------------------------------------------

    def fd_read(self, fd: int, iovs: int, count: int, nread: int) -> int:
        if self.at_migration_point():
            return Errno.SUCCESS
        source: bytes | bytearray
        if fd == 0:
            source, offset = self.state.stdin, self.state.stdin_offset
        elif (f := self.state.fds.get(fd)) is not None and not f.directory:
            source, offset = self.state.files.get(f.path, bytearray()), f.offset
        else:
            return Errno.BADF
        total = 0
        with memoryview(source) as src:
            for ptr, size in self._iovecs(iovs, count):
                chunk = src[offset : offset + size]
                self._write(ptr, chunk)
                offset += len(chunk)
                total += len(chunk)
                if len(chunk) < size:
                    break
        if fd == 0:
            self.state.stdin_offset = offset
        else:
            self.state.fds[fd].offset = offset
        self.progress_bytes += total
        self._put_u32(nread, total)
        return Errno.SUCCESS

    def fd_write(self, fd: int, iovs: int, count: int, nwritten: int) -> int:
        if self.at_migration_point():
            return Errno.SUCCESS
        data = b"".join(self._read(ptr, size) for ptr, size in self._iovecs(iovs, count))
        if fd in (1, 2):
            if len(data) > self.state.output_budget:
                self.state.output_overflowed = True
                raise OutputLimit
            self.state.output_budget -= len(data)
            (self._stdout if fd == 1 else self._stderr).extend(data)
        elif (f := self.state.fds.get(fd)) is not None and not f.directory:
            content = self.state.files.setdefault(f.path, bytearray())
            at = len(content) if f.append else f.offset
            if at > len(content):  # written past the end (after a seek): a hole of zeros
                content.extend(bytes(at - len(content)))
            content[at : at + len(data)] = data
            f.offset = at + len(data)
            self.dirty_fs = True
        else:
            return Errno.BADF
        self.progress_bytes += len(data)
        self._put_u32(nwritten, len(data))
        return Errno.SUCCESS

    def fd_close(self, fd: int) -> int:
        if fd in (0, 1, 2, SCRATCH_FD):
            return Errno.SUCCESS
        return Errno.SUCCESS if self.state.fds.pop(fd, None) is not None else Errno.BADF

    def fd_fdstat_get(self, fd: int, buf: int) -> int:
        if fd in (0, 1, 2):
            filetype, flags = _FILETYPE_CHAR, 0
        elif fd == SCRATCH_FD:
            filetype, flags = _FILETYPE_DIR, 0
        elif (f := self.state.fds.get(fd)) is not None:
            filetype = _FILETYPE_DIR if f.directory else _FILETYPE_FILE
            flags = _FDFLAG_APPEND if f.append else 0
        else:
            return Errno.BADF
        self._put("<BxHxxxxQQ", buf, filetype, flags, _RIGHTS_ALL, _RIGHTS_ALL)
        return Errno.SUCCESS

    def fd_fdstat_set_flags(self, fd: int, flags: int) -> int:
        f = self.state.fds.get(fd)
        if f is None:
            return Errno.SUCCESS if fd in (0, 1, 2) else Errno.BADF
        f.append = bool(flags & _FDFLAG_APPEND)
        return Errno.SUCCESS

    def fd_prestat_get(self, fd: int, buf: int) -> int:
        if fd != SCRATCH_FD:
            return Errno.BADF
        self._put("<BxxxI", buf, 0, len(_SCRATCH))
        return Errno.SUCCESS

    def fd_prestat_dir_name(self, fd: int, path: int, size: int) -> int:
        if fd != SCRATCH_FD:
            return Errno.BADF
        self._write(path, _SCRATCH.encode()[:size])
        return Errno.SUCCESS

    def fd_seek(self, fd: int, offset: int, whence: int, new_ptr: int) -> int:
        f = self.state.fds.get(fd)
        if f is None or f.directory:
            return Errno.SPIPE if fd in (0, 1, 2) else Errno.BADF
        size = len(self.state.files.get(f.path, b""))
        base = (0, f.offset, size)[whence] if whence in (0, 1, 2) else None
        if base is None or base + offset < 0:
            return Errno.INVAL
        f.offset = base + offset
        self._put("<Q", new_ptr, f.offset)
        return Errno.SUCCESS

    def fd_tell(self, fd: int, ptr: int) -> int:
        return self.fd_seek(fd, 0, 1, ptr)

    def _filestat(self, path: str | None, buf: int) -> int:
        if path is None:
            filetype, size = _FILETYPE_CHAR, 0
        elif path == "" or path in self.state.dirs:
            filetype, size = _FILETYPE_DIR, 0
        elif path in self.state.files:
            filetype, size = _FILETYPE_FILE, len(self.state.files[path])
        else:
            return Errno.NOENT
        self._put("<QQBxxxxxxxQQQQQ", buf, 0, 0, filetype, 1, size, 0, 0, 0)
        return Errno.SUCCESS

    def fd_filestat_get(self, fd: int, buf: int) -> int:
        if fd in (0, 1, 2):
            return self._filestat(None, buf)
        if fd == SCRATCH_FD:
            return self._filestat("", buf)
        f = self.state.fds.get(fd)
        return Errno.BADF if f is None else self._filestat(f.path, buf)

    def _resolve(self, dirfd: int, path_ptr: int, size: int) -> str | int:
        if dirfd == SCRATCH_FD:
            base = ""
        elif (d := self.state.fds.get(dirfd)) is not None and d.directory:
            base = d.path
        else:
            return Errno.BADF
        raw = self._read(path_ptr, size).decode(errors="replace")
        if raw.startswith("/"):
            return Errno.NOTCAPABLE
        path = _norm(f"{base}/{raw}")
        return Errno.NOTCAPABLE if path is None else path

    def path_filestat_get(self, dirfd: int, _flags: int, path: int, size: int, buf: int) -> int:
        resolved = self._resolve(dirfd, path, size)
        return resolved if isinstance(resolved, int) else self._filestat(resolved, buf)

    def path_open(  # noqa: PLR0917 - WASI's own signature: the guest calls it positionally
        self,
        dirfd: int,
        _dirflags: int,
        path: int,
        size: int,
        oflags: int,
        _rights: int,
        _inheriting: int,
        fdflags: int,
        fd_ptr: int,
    ) -> int:
        resolved = self._resolve(dirfd, path, size)
        if isinstance(resolved, int):
            return resolved
        is_dir = resolved == "" or resolved in self.state.dirs
        exists = is_dir or resolved in self.state.files
        if exists and oflags & _O_CREAT and oflags & _O_EXCL:
            return Errno.EXIST
        if oflags & _O_DIRECTORY and not is_dir:
            return Errno.NOTDIR if exists else Errno.NOENT
        if not exists:
            if not oflags & _O_CREAT:
                return Errno.NOENT
            parent = resolved.rpartition("/")[0]
            if parent and parent not in self.state.dirs:
                return Errno.NOENT
            self.state.files[resolved] = bytearray()
            self.dirty_fs = True
        elif oflags & _O_TRUNC and not is_dir:
            self.state.files[resolved] = bytearray()
            self.dirty_fs = True
        fd = self.state.next_fd
        self.state.next_fd += 1
        append = bool(fdflags & _FDFLAG_APPEND)
        self.state.fds[fd] = OpenFile(resolved, 0, append, is_dir)
        self._put("<I", fd_ptr, fd)
        return Errno.SUCCESS

    def path_create_directory(self, dirfd: int, path: int, size: int) -> int:
        resolved = self._resolve(dirfd, path, size)
        if isinstance(resolved, int):
            return resolved
        if resolved == "" or resolved in self.state.dirs or resolved in self.state.files:
            return Errno.EXIST
        self.state.dirs.append(resolved)
        self.dirty_fs = True
        return Errno.SUCCESS

    def path_unlink_file(self, dirfd: int, path: int, size: int) -> int:
        resolved = self._resolve(dirfd, path, size)
        if isinstance(resolved, int):
            return resolved
        if resolved in self.state.dirs or resolved == "":
            return Errno.ISDIR
        if self.state.files.pop(resolved, None) is None:
            return Errno.NOENT
        self.dirty_fs = True
        return Errno.SUCCESS

    def path_remove_directory(self, dirfd: int, path: int, size: int) -> int:
        resolved = self._resolve(dirfd, path, size)
        if isinstance(resolved, int):
            return resolved
        if resolved not in self.state.dirs:
            return Errno.NOENT if resolved not in self.state.files else Errno.NOTDIR
        prefix = resolved + "/"
        if any(p.startswith(prefix) for p in (*self.state.files, *self.state.dirs)):
            return Errno.NOTEMPTY
        self.state.dirs.remove(resolved)
        return Errno.SUCCESS

    def fd_readdir(self, fd: int, buf: int, size: int, cookie: int, used_ptr: int) -> int:
        if fd == SCRATCH_FD:
            base = ""
        elif (d := self.state.fds.get(fd)) is not None and d.directory:
            base = d.path
        else:
            return Errno.BADF
        prefix = f"{base}/" if base else ""
        names = sorted(
            (p[len(prefix) :], _FILETYPE_DIR if p in self.state.dirs else _FILETYPE_FILE)
            for p in (*self.state.dirs, *self.state.files)
            if p.startswith(prefix) and "/" not in p[len(prefix) :]
        )
        out = bytearray()
        for i, (name, filetype) in enumerate(names[cookie:], start=cookie + 1):
            encoded = name.encode()
            out += struct.pack("<QQIB3x", i, i, len(encoded), filetype) + encoded
        self._write(buf, bytes(out[:size]))
        self._put("<I", used_ptr, min(size, len(out)))
        return Errno.SUCCESS

    def scratch_bytes(self) -> int:
        return sum(map(len, self.state.files.values()))
