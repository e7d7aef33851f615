"""Running jobs on this device: the same WebAssembly and ONNX runtimes as the gateway's
(``hearth.runtime``, the ``local`` extra), created on first use, and a small named pool that runs
the async calls placed here (a run is CPU work: it needs a thread, unlike a call in flight)."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from hearth._blobs import Blob
from hearth._results import Inference, Stats, WasmRun
from hearth.errors import JobError
from hearth.protocol import OnnxJob, WasmJob
from hearth.runtime import installed

__all__ = ["LocalRuntimes", "local_runtimes_installed"]

T = TypeVar("T")


@functools.cache
def local_runtimes_installed() -> bool:
    """Whether this device can run jobs itself (the ``local`` extra); asked on every call, and
    a failed import is not cached by Python, so the answer is."""
    return installed("onnxruntime") and installed("wasmtime")


class LocalRuntimes:
    def __init__(self, stats: Stats, max_workers: int) -> None:
        self._stats = stats
        self._lock = threading.Lock()
        self._wasm_rt: Any = None
        self._onnx_rt: Any = None
        self._migratable_rt: Any = None
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="hearth-local")

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` (a local run) on the pool."""
        return self._pool.submit(fn)

    def _wasm_runtime(self) -> Any:
        with self._lock:
            if self._wasm_rt is None:
                from hearth.runtime.wasm import WasmRuntime

                self._wasm_rt = WasmRuntime()
            return self._wasm_rt

    def migratable_runtime(self) -> Any:
        """The runtime of migratable runs (hearth.migration), sharing the WASM engine."""
        wasm = self._wasm_runtime()
        with self._lock:
            if self._migratable_rt is None:
                from hearth.runtime.migratable import MigratableRuntime

                self._migratable_rt = MigratableRuntime(wasm)
            return self._migratable_rt

    def _onnx_runtime(self) -> Any:
        with self._lock:
            if self._onnx_rt is None:
                from hearth.runtime.onnx import OnnxRuntime

                self._onnx_rt = OnnxRuntime()
            return self._onnx_rt

    def run_wasm(self, job: WasmJob, blob: Blob, reason: str) -> WasmRun:
        started = time.perf_counter()
        try:
            outcome = self._wasm_runtime().run(
                blob.sha256, args=job.args, stdin=job.stdin, wasm=blob.data
            )
        except JobError as exc:
            exc.where, exc.job_id = "local", job.job_id
            raise
        self._stats.local_calls += 1
        return WasmRun(
            exit_code=outcome.exit_code,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            where="local",
            reason=reason,
            latency_ms=(time.perf_counter() - started) * 1e3,
            job_id=job.job_id,
        )

    def run_onnx(self, job: OnnxJob, blob: Blob, reason: str) -> Inference:
        from hearth.runtime.onnx import tensor_to_array

        started = time.perf_counter()
        try:
            tensors, provider = self._onnx_runtime().run(
                blob.sha256, job.inputs, job.outputs, model=blob.data
            )
        except JobError as exc:
            exc.where, exc.job_id = "local", job.job_id
            raise
        self._stats.local_calls += 1
        return Inference(
            outputs={t.name: tensor_to_array(t) for t in tensors},
            provider=provider,
            where="local",
            reason=reason,
            latency_ms=(time.perf_counter() - started) * 1e3,
            job_id=job.job_id,
        )

    def close(self) -> None:
        """Idempotent: waits for the runs under way, then frees the runtimes."""
        self._pool.shutdown(wait=True)
        with self._lock:
            runtimes, self._wasm_rt, self._onnx_rt = (self._wasm_rt, self._onnx_rt), None, None
            self._migratable_rt = None
        for rt in runtimes:
            if rt is not None:
                rt.close()
