"""The ONNX runner: onnxruntime sessions cached per model hash, on the best execution provider
this box has (see hearth_gateway.accelerators)."""

from __future__ import annotations

from pathlib import Path

from hearth.protocol import OnnxJob, OnnxResult, Reply
from hearth_gateway.runners import WorkerSettings, WorkItem, onnx_runtime

__all__ = ["OnnxRunner"]


class OnnxRunner:
    def __init__(self, settings: WorkerSettings) -> None:
        self._runtime = onnx_runtime(settings)

    def run(self, item: WorkItem) -> Reply:
        job = item.job
        assert isinstance(job, OnnxJob)
        outputs, provider = self._runtime.run(
            job.model, job.inputs, job.outputs, path=Path(item.blob_path)
        )
        return OnnxResult(job_id=job.job_id, outputs=outputs, provider=provider)

    def describe(self) -> dict[str, list[str]]:
        return {"providers": list(self._runtime.providers)}

    def close(self) -> None:
        self._runtime.close()
