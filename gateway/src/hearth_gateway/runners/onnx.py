"""The ONNX runner: onnxruntime sessions cached per model hash, on the best execution provider
this box has (see hearth_gateway.accelerators)."""

from __future__ import annotations

from pathlib import Path

from hearth.protocol import Described, OnnxJob, OnnxResult, Reply, TensorInfo
from hearth_gateway.runners import Inspect, WorkerSettings, WorkItem, onnx_runtime

__all__ = ["OnnxRunner"]


class OnnxRunner:
    def __init__(self, settings: WorkerSettings) -> None:
        self._runtime = onnx_runtime(settings)

    def run(self, item: WorkItem) -> Reply:
        job = item.job
        if isinstance(job, Inspect):
            ins, outs = self._runtime.signature(job.blob, path=Path(item.blob_path))
            return Described(
                job_id=job.job_id,
                blob=job.blob,
                kind="onnx",
                inputs=[TensorInfo(*info) for info in ins],
                outputs=[TensorInfo(*info) for info in outs],
            )
        assert isinstance(job, OnnxJob)
        outputs, provider = self._runtime.run(
            job.model, job.inputs, job.outputs, path=Path(item.blob_path)
        )
        return OnnxResult(job_id=job.job_id, outputs=outputs, provider=provider)

    def describe(self) -> dict[str, list[str]]:
        return {"providers": list(self._runtime.providers)}

    def close(self) -> None:
        self._runtime.close()
