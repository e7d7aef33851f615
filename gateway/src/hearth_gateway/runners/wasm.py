"""The WebAssembly runner: WASI command modules via the SDK's runtime (the same code a device
runs locally), with compiled modules cached on disk by hash."""

from __future__ import annotations

import time
from pathlib import Path

from hearth.errors import ErrorCode, JobError
from hearth.protocol import Error, Reply, Timing, WasmJob, WasmResult
from hearth.runtime.wasm import WasmRuntime
from hearth_gateway.runners import WorkerSettings, WorkItem

__all__ = ["WasmRunner"]


class WasmRunner:
    def __init__(self, settings: WorkerSettings) -> None:
        self._limits = settings.wasm_limits
        self._runtime = WasmRuntime(cache_dir=Path(settings.cache_dir) / "wasm")

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
