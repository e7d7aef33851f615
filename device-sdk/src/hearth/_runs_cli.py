"""``hearth run --migratable``, ``hearth resume`` and ``hearth migrate``: a migratable run
followed from a shell.

The process that started a run holds it (``MigratableRun`` lives in it) until the run ends, so
the other commands reach that process, not the run: ``hearth migrate`` finds its pid file and
signals it (SIGUSR1: to the gateway, SIGUSR2: back to this device). On SIGINT or SIGTERM it
pauses the run; with ``--checkpoint-to`` the final snapshot is then in that file, and
``hearth resume FILE`` goes on from there. Signal handlers only queue the signal: the main
thread acts on it between short waits for the result, never inside the handler.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from hearth._identity import config_dir
from hearth.client import Client
from hearth.errors import ErrorCode, JobError
from hearth.migration import Hop, MigratableRun, RunOutcome, load_module
from hearth.runtime.limits import WasmLimits

__all__ = [
    "EXIT_INTERRUPTED",
    "add_migrate_command",
    "add_resume_command",
    "add_run_options",
    "migrate",
    "resume",
    "run_migratable",
]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command it interrupted
EXIT_NO_RUN = 2
_POLL_S = 0.1  # how soon a queued signal is acted on while the run goes on
_FIRST_HOP_WAIT_S = 10.0  # for the "hearth: run ID on WHERE" line: until it has arrived
_PAUSE_TIMEOUT_S = 60.0
_SAFE_RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
Target = Literal["edge", "local"]
_MOVES: dict[int, Target] = {signal.SIGUSR1: "edge", signal.SIGUSR2: "local"}
_TARGET_SIGNALS = {"edge": signal.SIGUSR1, "local": signal.SIGUSR2}

ClientFactory = Callable[[argparse.Namespace], Client]

_MIGRATE_EPILOG = """\
example:
  hearth run --migratable --checkpoint-to run.snap hashchain.wasm 200 < data > out &
  # hearth: run run-3f9c0a1b2c4d on local
  hearth migrate run-3f9c0a1b2c4d --to edge    # the same as: kill -USR1 PID
  hearth migrate run-3f9c0a1b2c4d --to local   # the same as: kill -USR2 PID

It signals the process running the run (its pid file is $XDG_RUNTIME_DIR/hearth/runs/RUN_ID.pid);
that process moves the run and prints the hops at the end with --explain.
"""

_RESUME_EPILOG = """\
example:
  hearth run --migratable --checkpoint-to run.snap hashchain.wasm 200 < data > out
  ^C                                      # paused: the final snapshot is in run.snap
  hearth resume run.snap --module hashchain.wasm > out   # the whole output, as if never paused
"""


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options ``hearth run`` takes for migratable runs."""
    parser.add_argument(
        "--migratable",
        action="store_true",
        help="run it as a migratable run: it can move between this device and the gateway "
        "while it runs (SIGUSR1: to the gateway, SIGUSR2: back here; or `hearth migrate`)",
    )
    _snapshot_options(parser)


def _snapshot_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fuel",
        type=_units,
        metavar="UNITS",
        help="fuel for the run's hops on this device: about one unit per WebAssembly "
        "instruction, counted over all its hops (default 2e9); a gateway applies its own "
        "policy's wasm.fuel",
    )
    parser.add_argument(
        "--checkpoint-to",
        type=Path,
        metavar="FILE",
        help="keep the run's latest snapshot in FILE; on SIGINT/SIGTERM pause the run there "
        "(exit 130) for `hearth resume FILE --module MODULE.wasm`",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=5.0,
        metavar="S",
        help="with --checkpoint-to: a snapshot every S seconds (default 5)",
    )


def _units(text: str) -> int:
    value = float(text)  # 2e10 reads better than 20000000000
    if not value.is_integer() or value <= 0:
        raise argparse.ArgumentTypeError(f"a positive whole number, not {text}")
    return int(value)


def add_resume_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], object],
) -> None:
    r = sub.add_parser(
        "resume",
        help="continue a migratable run from a snapshot file, here or on a gateway",
        epilog=_RESUME_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(r)
    r.add_argument("snapshot", type=Path, help="a snapshot file (--checkpoint-to)")
    r.add_argument(
        "--module",
        type=Path,
        required=True,
        metavar="MODULE.wasm",
        help="the run's module (its .migratable.wasm, or the plain module: it is instrumented "
        "again here, which gives the same bytes with the same Binaryen)",
    )
    r.add_argument(
        "--where",
        choices=["auto", "edge", "local"],
        default="auto",
        help="edge: on the gateway; local: on this device; auto (default): where it is quicker",
    )
    r.add_argument("--explain", action="store_true", help="print the run's hops to stderr")
    _snapshot_options(r)


def add_migrate_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser(
        "migrate",
        help="move a running `hearth run --migratable` to the gateway or back to this device",
        epilog=_MIGRATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("run_id", help="the run's id, as `hearth run --migratable` printed it")
    m.add_argument(
        "--to",
        choices=["edge", "local"],
        required=True,
        help="edge: to the gateway; local: back to this device",
    )


# -- the commands ------------------------------------------------------------------------------


def run_migratable(args: argparse.Namespace, make_client: ClientFactory) -> int:
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    where = None if args.where == "auto" else args.where
    with _Signals() as signals, make_client(args) as client:
        run = client.start_wasm(
            args.module,
            stdin=stdin,
            args=args.args,
            where=where,
            checkpoint_every_s=_checkpoint_every(args),
            limits=_limits(args),
        )
        return _follow(run, args, signals, resume_hint=str(args.module))


def resume(args: argparse.Namespace, make_client: ClientFactory) -> int:
    where = None if args.where == "auto" else args.where
    snapshot = args.snapshot.read_bytes()
    module = load_module(args.module)
    with _Signals() as signals, make_client(args) as client:
        run = client.resume(
            snapshot,
            module,
            where=where,
            checkpoint_every_s=_checkpoint_every(args),
            limits=_limits(args),
        )
        return _follow(run, args, signals, resume_hint=str(args.module))


def migrate(args: argparse.Namespace) -> int:
    found = _find_pid_file(args.run_id)
    if found is None:
        print(f"hearth migrate: no run {args.run_id} on this machine", file=sys.stderr)
        return EXIT_NO_RUN
    path, pid = found
    try:
        os.kill(pid, _TARGET_SIGNALS[args.to])
    except ProcessLookupError:
        with contextlib.suppress(OSError):
            path.unlink()  # its process is gone: the file is stale
        print(
            f"hearth migrate: no run {args.run_id} (its process {pid} has ended)", file=sys.stderr
        )
        return EXIT_NO_RUN
    print(f"hearth: asked run {args.run_id} (pid {pid}) to move to {args.to}", file=sys.stderr)
    return 0


def _limits(args: argparse.Namespace) -> WasmLimits | None:
    return None if args.fuel is None else WasmLimits(fuel=args.fuel)


def _checkpoint_every(args: argparse.Namespace) -> float:
    # 0: the gateway's own policy; asked for only when there is somewhere to keep them.
    return float(args.checkpoint_every) if args.checkpoint_to is not None else 0.0


# -- following a run ---------------------------------------------------------------------------


def _follow(
    run: MigratableRun, args: argparse.Namespace, signals: _Signals, resume_hint: str
) -> int:
    """Wait for the run, acting on signals meanwhile; write its output like ``hearth run``."""
    writer = _SnapshotWriter(args.checkpoint_to) if args.checkpoint_to is not None else None
    if writer is not None:
        run.on_snapshot = writer.write
    with _pid_file(run.run_id):
        print(f"hearth: run {run.run_id} on {_first_place(run)}", file=sys.stderr, flush=True)
        every_s = args.checkpoint_every if writer is not None else None
        outcome = _wait(run, signals, every_s)
    if outcome is None:  # interrupted
        code = _stop(run, writer, resume_hint)
        if args.explain and code == EXIT_INTERRUPTED:
            _explain(run.hops)
        return code
    return _finish(outcome, args.explain)


def _first_place(run: MigratableRun) -> str:
    deadline = time.monotonic() + _FIRST_HOP_WAIT_S
    while not run.hops and not run.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    hops = run.hops
    return hops[0].where if hops else run.where


def _wait(run: MigratableRun, signals: _Signals, every_s: float | None) -> RunOutcome | None:
    """The run's outcome, or None when SIGINT/SIGTERM asked to stop it. ``every_s``: take a
    snapshot that often while the run is on this device (a gateway sends its own)."""
    next_snapshot = time.monotonic() + every_s if every_s else None
    while True:
        with contextlib.suppress(TimeoutError):
            return run.result(_POLL_S)
        for signum in signals.drain():
            if signum in _MOVES:
                _move(run, _MOVES[signum], signum)
            else:
                return None
        if next_snapshot is not None and time.monotonic() >= next_snapshot:
            if run.where == "local":
                with contextlib.suppress(TimeoutError):
                    run.snapshot()  # on_snapshot keeps it
            next_snapshot = time.monotonic() + (every_s or 0.0)


def _move(run: MigratableRun, to: Target, signum: int) -> None:
    name = signal.Signals(signum).name
    try:
        run.migrate(to, reason=f"moved to {to} by {name} (hearth migrate)")
    except TimeoutError as exc:
        print(f"hearth: {exc}", file=sys.stderr, flush=True)


def _stop(run: MigratableRun, writer: _SnapshotWriter | None, resume_hint: str) -> int:
    if writer is None:
        run.cancel()
        print(f"hearth: run {run.run_id} cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    snapshot = run.pause(_PAUSE_TIMEOUT_S)
    if snapshot is None:
        try:
            return _finish(run.result(0), explain=False)  # it ended first: its own exit
        except JobError as exc:
            if exc.code is not ErrorCode.CANCELLED:
                raise
        print(
            f"hearth: run {run.run_id} stopped before its first snapshot; nothing to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    writer.write(snapshot)
    print(
        f"hearth: run {run.run_id} paused; continue it with: hearth resume {writer.path} "
        f"--module {resume_hint}",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _finish(outcome: RunOutcome, explain: bool) -> int:
    sys.stdout.buffer.write(outcome.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(outcome.stderr)
    sys.stderr.flush()
    if explain:
        _explain(outcome.hops)
        print(
            f"hearth: run {outcome.run_id} finished on {outcome.where} "
            f"(exit {outcome.exit_code}, {len(outcome.hops)} hops)",
            file=sys.stderr,
        )
    return outcome.exit_code


def _explain(hops: Sequence[Hop]) -> None:
    for n, hop in enumerate(hops, 1):
        print(f"hearth: hop {n}: {hop.where}: {hop.reason}", file=sys.stderr)


class _Signals:
    """SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 queued while a run is followed (the previous
    handlers come back at the end). A SimpleQueue because its put() may be called from a
    signal handler that interrupted a get() or another put()."""

    _HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._previous: dict[int, Any] = {}  # signal.signal's handler union, as it gave it

    def __enter__(self) -> _Signals:
        for signum in self._HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self._queue.put(signum)

    def drain(self) -> Iterator[int]:
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return


class _SnapshotWriter:
    """Keeps the newest snapshot in one file, replaced atomically (a reader, or a crash,
    sees the previous file or the new one, never half of one). Called from the run's threads
    and the main thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._last: bytes | None = None

    def write(self, snapshot: bytes) -> None:
        with self._lock:
            if snapshot is self._last:
                return
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(snapshot)
                    out.flush()
                    os.fsync(out.fileno())
                Path(tmp).replace(self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    Path(tmp).unlink()
                raise
            self._last = snapshot


# -- pid files ---------------------------------------------------------------------------------


def _run_dirs() -> list[Path]:
    """Where pid files go, in order of preference: the login session's runtime directory,
    then the directory hearth keeps its pairings in, then one of our own in /tmp."""
    dirs = []
    if os.environ.get("XDG_RUNTIME_DIR"):
        dirs.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "hearth" / "runs")
    dirs.append(config_dir() / "runs")
    dirs.append(Path(tempfile.gettempdir()) / f"hearth-{os.getuid()}" / "runs")
    return dirs


def _usable(directory: Path) -> bool:
    """Whether ``directory`` exists (made if need be, private) and is ours, as is the one
    above it: a world-writable /tmp could hold someone else's directory or a link by that
    name."""
    try:
        directory.parent.parent.mkdir(parents=True, exist_ok=True)
        for d in (directory.parent, directory):
            d.mkdir(mode=0o700, exist_ok=True)
            info = d.lstat()
            if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
                return False
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _pid_file(run_id: str) -> Iterator[Path | None]:
    """``RUN_ID.pid`` (this process's pid, then the run id) for the run's life."""
    path = None
    if _SAFE_RUN_ID.fullmatch(run_id):
        for directory in _run_dirs():
            if _usable(directory):
                path = directory / f"{run_id}.pid"
                tmp = directory / f".{run_id}.pid.{os.getpid()}"
                tmp.write_text(f"{os.getpid()}\n{run_id}\n")
                tmp.replace(path)  # `hearth migrate` never reads half of it
                break
    try:
        yield path
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


def _find_pid_file(run_id: str) -> tuple[Path, int] | None:
    if not _SAFE_RUN_ID.fullmatch(run_id):
        return None
    for directory in _run_dirs():
        path = directory / f"{run_id}.pid"
        try:
            pid_line, id_line, *_ = path.read_text().splitlines()
            pid = int(pid_line)
        except (OSError, ValueError):
            continue
        if id_line == run_id and pid > 0 and _is_hearth(pid):
            return path, pid
    return None


def _is_hearth(pid: int) -> bool:
    """Whether ``pid`` still runs hearth (a recycled pid must not get a signal whose default
    action ends it). Without /proc, whether it exists."""
    try:
        return b"hearth" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False  # /proc is there and the process is not
    except OSError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
