"""Runners are plugins: one module per kind of job behind the small ``Runner`` interface, picked
by name from the configuration (``runners = ["wasm", "onnx"]``). They live in worker processes.

To add one: write a module with a class implementing ``Runner``, and add it to ``REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from hearth.protocol import OnnxJob, Reply, WasmJob
from hearth.runtime.limits import WasmLimits

__all__ = ["REGISTRY", "Job", "Runner", "WorkItem", "WorkerSettings", "runner_for"]

Job = WasmJob | OnnxJob


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker process is told at start (on its command line, as JSON)."""

    runners: list[str]
    cache_dir: str
    wasm_limits: WasmLimits
    onnx_threads: int = 0
    providers: list[str] = []  # empty: best available


class WorkItem(msgspec.Struct, frozen=True, kw_only=True):
    """One job as handed from the daemon to a worker: already validated and admitted."""

    job: Job
    blob_path: str
    queue_ms: float


class Runner(Protocol):
    def run(self, item: WorkItem) -> Reply:
        """Run the job and return its reply (a result or an Error); never raise for a job's
        own failure."""
        ...

    def describe(self) -> dict[str, list[str]]:
        """What to advertise: e.g. {"providers": [...]} for status and mDNS."""
        ...

    def close(self) -> None: ...


def _wasm(settings: WorkerSettings) -> Runner:
    from hearth_gateway.runners.wasm import WasmRunner

    return WasmRunner(settings)


def _onnx(settings: WorkerSettings) -> Runner:
    from hearth_gateway.runners.onnx import OnnxRunner

    return OnnxRunner(settings)


# Imported lazily, so a box without onnxruntime can still run WebAssembly.
REGISTRY: dict[str, Callable[[WorkerSettings], Runner]] = {"wasm": _wasm, "onnx": _onnx}

_JOB_RUNNER = {WasmJob: "wasm", OnnxJob: "onnx"}


def runner_for(job: Job) -> str:
    return _JOB_RUNNER[type(job)]
