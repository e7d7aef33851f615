"""The WebAssembly runner: WASI command modules via the SDK's runtime (the same code a device
runs locally), with compiled modules cached on disk by hash. Modules that import wasi-nn run
their models on this box's execution providers, chosen as for ONNX jobs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from hearth.errors import ErrorCode, JobError
from hearth.protocol import Error, Reply, Timing, WasmJob, WasmResult
from hearth.runtime.wasi_nn import WasiNn
from hearth.runtime.wasm import WasmRuntime
from hearth_gateway.runners import WorkerSettings, WorkItem

if TYPE_CHECKING:
    from hearth.runtime.onnx import OnnxRuntime

__all__ = ["WasmRunner"]


class WasmRunner:
    def __init__(self, settings: WorkerSettings) -> None:
        self._limits = settings.wasm_limits

        def onnx() -> OnnxRuntime:
            # Imported and created on a module's first wasi-nn load, not at worker start.
            from hearth.runtime.onnx import OnnxRuntime

            return OnnxRuntime(
                providers=settings.providers or None, intra_op_threads=settings.onnx_threads
            )

        self._runtime = WasmRuntime(
            cache_dir=Path(settings.cache_dir) / "wasm", wasi_nn=WasiNn.if_available(onnx)
        )

    def run(self, item: WorkItem) -> Reply:
        job = item.job
        assert isinstance(job, WasmJob)
        started = time.perf_counter()
        try:
            outcome = self._runtime.run(
                job.module,
                args=job.args,
                stdin=job.stdin,
                limits=self._limits,
                path=Path(item.blob_path),
            )
        except JobError as exc:
            return Error(code=exc.code, message=exc.message, job_id=job.job_id)
        except OSError as exc:  # the blob vanished from the store under us
            return Error(code=ErrorCode.INTERNAL, message=f"blob unreadable: {exc.strerror}",
                         job_id=job.job_id)  # fmt: skip
        return WasmResult(
            job_id=job.job_id,
            exit_code=outcome.exit_code,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            timing=Timing(queue_ms=item.queue_ms, run_ms=(time.perf_counter() - started) * 1e3),
        )

    def describe(self) -> dict[str, list[str]]:
        return {}

    def close(self) -> None:
        self._runtime.close()
