"""Worker process: ``python -m hearth_gateway.worker SETTINGS_JSON``.

Reads WorkItems from stdin, writes encoded Replies to stdout, one frame each. A crash in here (a
hostile model, a runtime bug) costs only the job in hand: the daemon sees the pipe close, answers
that job with worker_crashed, and starts a new worker.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
import time
from typing import cast

import msgspec

from hearth.errors import ErrorCode, JobError
from hearth.protocol import (
    CallResult,
    Error,
    OnnxResult,
    PipelineReply,
    Reply,
    Timing,
    WasmResult,
    encode,
)
from hearth_gateway._frames import read_frame, write_frame
from hearth_gateway.runners import (
    REGISTRY,
    Runner,
    RunSignal,
    Steerable,
    TaskOutcome,
    ToWorker,
    WorkerSettings,
    WorkItem,
    runner_for,
)

log = logging.getLogger("hearth_gateway.worker")

# The results that report where the gateway spent the job's time.
TIMED = (WasmResult, OnnxResult, CallResult, PipelineReply)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to kill us when the daemon dies, even by SIGKILL: no orphaned workers."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000


def _drop_network() -> str:
    """Move this process into a network namespace of its own (nothing in it but a loopback
    that is down), so that even a runtime escape cannot send data anywhere: only the daemon
    talks to the broker. As root this needs nothing; otherwise an unprivileged user namespace
    is tried. Returns how it went, for the gateway's status."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return "shared: no libc"
    for flags, how in ((_CLONE_NEWNET, "isolated"), (_CLONE_NEWUSER | _CLONE_NEWNET, "isolated")):
        if libc.unshare(flags) == 0:
            return how
    errno = ctypes.get_errno()
    return f"shared: the kernel refused a network namespace ({os.strerror(errno)})"


def _run(runner: Runner, item: WorkItem) -> Reply | TaskOutcome:
    """One job: its result, or the Error reply for its failure; either with its timing."""
    started = time.perf_counter()
    try:
        reply = runner.run(item)
    except JobError as exc:
        return Error(code=exc.code, message=exc.message, job_id=item.job.job_id)
    except OSError as exc:  # its blob vanished from the store under us
        return Error(
            code=ErrorCode.INTERNAL,
            message=f"blob unreadable: {exc.strerror}",
            job_id=item.job.job_id,
        )
    if isinstance(reply, TIMED):
        timing = Timing(queue_ms=item.queue_ms, run_ms=(time.perf_counter() - started) * 1e3)
        reply = msgspec.structs.replace(reply, timing=timing)
    return reply


def main(argv: list[str]) -> int:
    _die_with_parent()
    network = _drop_network()
    # SIGTERM to the daemon's process group must not kill a job mid-flight: the daemon drains
    # and then closes our stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="worker %(process)d: %(message)s")
    settings = msgspec.json.decode(argv[1], type=WorkerSettings)
    # Frames go over a private copy of fd 1; anything a library prints goes to stderr instead
    # of corrupting the frame stream.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    runners: dict[str, Runner] = {name: REGISTRY[name](settings) for name in settings.runners}
    described: dict[str, list[str]] = {}
    for runner in runners.values():
        described.update(runner.describe())
    write_frame(out_fd, msgspec.msgpack.encode({"ready": True, "network": network, **described}))
    migrate = cast(Steerable | None, runners.get("migrate"))
    if migrate is not None:
        # A migratable run writes checkpoints before its answer, and reads the daemon's
        # signals while it runs (runners/migrate.py).
        migrate.emit = lambda frame: write_frame(out_fd, frame)
        migrate.control_fd = 0
    decoder = msgspec.msgpack.Decoder(ToWorker)
    gc.freeze()  # the runtimes loaded above stay: full collections need not walk them
    while True:
        try:
            frame = read_frame(0)
        except EOFError:
            break
        item = decoder.decode(frame)
        if isinstance(item, RunSignal):
            # For a run that has just ended (or not yet started): the runner keeps it by job id.
            if migrate is not None:
                migrate.control(item.job_id, item.action)
            continue
        name = runner_for(item.job)
        chosen = runners.get(name)
        if chosen is None:
            reply = Error(
                code=ErrorCode.UNSUPPORTED,
                message=f"runner {name!r} not enabled on this gateway",
                job_id=item.job.job_id,
            )
            write_frame(out_fd, encode(reply))
            continue
        write_frame(out_fd, encode(_run(chosen, item)))
    for runner in runners.values():
        runner.close()
    return 0


if __name__ == "__main__":
    status = main(sys.argv)
    sys.stderr.flush()
    # Skip interpreter finalization: wasmtime's runtime threads panic ("panic_cannot_unwind")
    # when Python tears down under them, which only adds noise to the gateway's log.
    os._exit(status)
