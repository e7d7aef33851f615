"""The ONNX runner: onnxruntime sessions cached per model hash, on the best execution provider
this box has (see hearth_gateway.accelerators)."""

from __future__ import annotations

import time
from pathlib import Path

from hearth.errors import ErrorCode, JobError
from hearth.protocol import Error, OnnxJob, OnnxResult, Reply, Timing
from hearth.runtime.onnx import OnnxRuntime
from hearth_gateway.runners import WorkerSettings, WorkItem

__all__ = ["OnnxRunner"]


class OnnxRunner:
    def __init__(self, settings: WorkerSettings) -> None:
        self._runtime = OnnxRuntime(
            providers=settings.providers or None, intra_op_threads=settings.onnx_threads
        )

    def run(self, item: WorkItem) -> Reply:
        job = item.job
        assert isinstance(job, OnnxJob)
        started = time.perf_counter()
        try:
            outputs, provider = self._runtime.run(
                job.model, job.inputs, job.outputs, path=Path(item.blob_path)
            )
        except JobError as exc:
            return Error(code=exc.code, message=exc.message, job_id=job.job_id)
        except OSError as exc:  # the blob vanished from the store under us
            return Error(code=ErrorCode.INTERNAL, message=f"blob unreadable: {exc.strerror}",
                         job_id=job.job_id)  # fmt: skip
        return OnnxResult(
            job_id=job.job_id,
            outputs=outputs,
            provider=provider,
            timing=Timing(queue_ms=item.queue_ms, run_ms=(time.perf_counter() - started) * 1e3),
        )

    def describe(self) -> dict[str, list[str]]:
        return {"providers": list(self._runtime.providers)}

    def close(self) -> None:
        self._runtime.close()
