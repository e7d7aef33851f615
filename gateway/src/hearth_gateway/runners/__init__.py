"""Runners are plugins: one module per kind of job behind the small ``Runner`` interface, picked
by name from the configuration (``runners = ["wasm", "onnx"]``). They live in worker processes.

To add one: write a module with a class implementing ``Runner``, and add it to ``REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec

from hearth.protocol import CallJob, OnnxJob, PipelineJob, Reply, RunResume, RunStart, WasmJob
from hearth.runtime.limits import WasmLimits

if TYPE_CHECKING:  # onnxruntime is imported only by the runners that need it
    from hearth.runtime.onnx import OnnxRuntime

__all__ = [
    "REGISTRY",
    "Inspect",
    "Job",
    "RunSignal",
    "Runner",
    "Steerable",
    "TaskAction",
    "TaskEvent",
    "TaskOutcome",
    "ToWorker",
    "VisionClose",
    "WorkItem",
    "WorkerSettings",
    "onnx_runtime",
    "runner_for",
]


class TaskEvent(msgspec.Struct, frozen=True, kw_only=True, tag="task_event"):
    """One event for a persistent task, with everything the worker needs: the worker keeps
    nothing between events, so any worker can take any task's next event."""

    job_id: str  # task id and sequence number, for logs
    task_id: str
    module: str  # sha256
    kind: int  # 1 message, 2 timer
    topic: str
    payload: bytes
    state: bytes  # compressed checkpoint; empty: a fresh instance (call _initialize)
    kv: dict[str, bytes]
    publish: list[str]  # grants, so the guest's publish() can answer -1 at once


class TaskAction(msgspec.Struct, frozen=True):
    kind: str  # publish | notify | log
    topic: str
    payload: bytes


class TaskOutcome(msgspec.Struct, frozen=True, kw_only=True, tag="task_outcome"):
    ok: bool
    error: str = ""
    code: str = ""  # an ErrorCode value when not ok
    state: bytes = b""
    kv: dict[str, bytes] = {}
    actions: list[TaskAction] = []
    fuel_used: int = 0
    memory_bytes: int = 0


class VisionClose(msgspec.Struct, frozen=True, kw_only=True, tag="vision_close"):
    """Drop a session's state in the worker that holds it (the daemon decides when: an explicit
    ``session_close`` or the idle timeout)."""

    job_id: str
    session: str  # scoped: "{client}/{session}"


class Inspect(msgspec.Struct, frozen=True, kw_only=True, tag="inspect"):
    """A ``describe`` request, for the runner of its blob's kind: the daemon only reads the
    blob's first bytes (binary WebAssembly goes to ``wasm``, anything else to ``onnx``); the
    runner opens it, so no module is compiled and no model loaded in the daemon."""

    job_id: str
    blob: str  # sha256
    runner: str  # "wasm" | "onnx"


Job = (
    WasmJob
    | OnnxJob
    | TaskEvent
    | CallJob
    | PipelineJob
    | VisionClose
    | RunStart
    | RunResume
    | Inspect
)


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker process is told at start (on its command line, as JSON)."""

    runners: list[str]
    cache_dir: str
    wasm_limits: WasmLimits
    task_limits: WasmLimits = WasmLimits()
    task_max_actions: int = 64
    task_max_payload: int = 65_536
    onnx_threads: int = 0
    providers: list[str] = []  # empty: best available
    max_megapixels: float = 40.0  # images larger than this (from their header) are refused
    max_streams: int = 64  # background models kept per worker
    gateway_id: str = ""  # names this gateway in a migratable run's hops
    checkpoint_every_s: float = 5.0  # a migratable run's checkpoints, unless it asks otherwise
    checkpoint_every_mib: float = 64.0  # ... or by MiB of I/O progress, whichever first
    precopy_over_mib: float = 16.0  # a run this large leaving is pre-copied; 0: never
    # A run's snapshots and rounds larger than this go to a device that acknowledges them
    # (run_start window_bytes) in run_chunk pieces of this size, sent by the worker itself.
    max_chunk_bytes: int = 4 * 2**20


class WorkItem(msgspec.Struct, frozen=True, kw_only=True, tag="work"):
    """One job as handed from the daemon to a worker: already validated and admitted."""

    job: Job
    blob_path: str
    snapshot_path: str = ""  # a resumed run's snapshot blob (run_resume)
    snapshot_key: bytes = b""  # its own key, when it is sealed at rest (sealed_file.py)
    queue_ms: float
    scope: str = ""  # the submitting device: streams and sessions are named per device
    session_new: bool = False  # first frame of a session: the worker opens it


class RunSignal(msgspec.Struct, frozen=True, kw_only=True, tag="signal"):
    """From the daemon to a worker while it runs a migratable run (hearth_gateway.runs):
    stop it at its next migration point, or take a checkpoint there. Named by the run's job id,
    so a signal that arrives after its run ended cannot touch the next one."""

    job_id: str
    action: str  # "pause" | "checkpoint" | "received"
    received: int = 0  # with "received": the device's acknowledgement (flow control), bytes


# What the daemon writes to a worker: a job, or a signal about the job it runs.
ToWorker = WorkItem | RunSignal


class Runner(Protocol):
    def run(self, item: WorkItem) -> Reply | TaskOutcome:
        """Run the job and return its result. A job's own failure is raised as JobError (an
        OSError reading its blob counts as ``internal``): the worker answers it with an Error
        reply, and stamps every reply's ``timing``."""
        ...

    def describe(self) -> dict[str, list[str]]:
        """What to advertise: e.g. {"providers": [...]} for status and mDNS."""
        ...

    def close(self) -> None: ...


_onnx_runtime: OnnxRuntime | None = None


def onnx_runtime(settings: WorkerSettings) -> OnnxRuntime:
    """This worker process's one ONNX runtime, made on first use: the ONNX, vision and wasi-nn
    runners share it, so a model they all use is loaded (and its session warmed) once."""
    global _onnx_runtime  # noqa: PLW0603 - one per process, like the process's runners
    if _onnx_runtime is None:
        from hearth.runtime.onnx import OnnxRuntime
        from hearth_gateway import accelerators

        providers = settings.providers or accelerators.available_providers()
        if any(p != accelerators.CPU for p in providers):
            # An accelerator: decide per model which provider runs it (runners/accelerated.py).
            from hearth_gateway.runners.accelerated import AcceleratedRuntime

            options = accelerators.provider_options()
            cache = accelerators.ChoiceCache(
                Path(settings.cache_dir), accelerators.provider_package(), options
            )
            _onnx_runtime = AcceleratedRuntime(
                providers, cache, intra_op_threads=settings.onnx_threads, options=options
            )
        else:
            _onnx_runtime = OnnxRuntime(
                providers=providers or None, intra_op_threads=settings.onnx_threads
            )
    return _onnx_runtime


def _wasm(settings: WorkerSettings) -> Runner:
    from hearth_gateway.runners.wasm import WasmRunner

    return WasmRunner(settings)


def _task(settings: WorkerSettings) -> Runner:
    from hearth_gateway.runners.task import TaskRunner

    return TaskRunner(settings)


def _onnx(settings: WorkerSettings) -> Runner:
    from hearth_gateway.runners.onnx import OnnxRunner

    return OnnxRunner(settings)


def _vision(settings: WorkerSettings) -> Runner:
    from hearth_gateway.runners.vision import VisionRunner

    return VisionRunner(settings)


def _migrate(settings: WorkerSettings) -> Runner:
    from hearth_gateway.runners.migrate import MigrateRunner

    return MigrateRunner(settings)


class Steerable(Runner, Protocol):
    """A runner whose job can be steered while it runs (the migratable-run runner): the
    worker gives it a way to send interim frames and the fd the daemon's signals arrive on."""

    emit: Callable[[bytes], None]
    control_fd: int

    def control(self, job_id: str, action: str) -> None: ...


# Imported lazily, so a box without onnxruntime can still run WebAssembly.
REGISTRY: dict[str, Callable[[WorkerSettings], Runner]] = {
    "wasm": _wasm,
    "onnx": _onnx,
    "task": _task,
    "vision": _vision,
    "migrate": _migrate,
}

_JOB_RUNNER: dict[type, str] = {
    WasmJob: "wasm",
    OnnxJob: "onnx",
    TaskEvent: "task",
    CallJob: "vision",
    PipelineJob: "vision",
    VisionClose: "vision",
    RunStart: "migrate",
    RunResume: "migrate",
}


def runner_for(job: Job) -> str:
    if isinstance(job, Inspect):
        return job.runner
    return _JOB_RUNNER[type(job)]
