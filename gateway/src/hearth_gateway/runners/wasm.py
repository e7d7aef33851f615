"""The WebAssembly runner: WASI command modules via the SDK's runtime (the same code a device
runs locally), with compiled modules cached on disk by hash. Modules that import wasi-nn run
their models on this box's execution providers, chosen as for ONNX jobs.

Each job gets a fresh ``/scratch`` directory under ``<state>/scratch/<worker pid>/``; what the
job leaves there is removed when it ends, and what a crashed worker left behind is removed by
the next worker to start.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hearth.errors import ErrorCode, JobError
from hearth.protocol import Error, Reply, Timing, WasmJob, WasmResult
from hearth.runtime.wasi_nn import WasiNn
from hearth.runtime.wasm import WasmRuntime, remove_tree
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

        # The cache directory sits in the gateway's state directory; scratch goes beside it.
        scratch = Path(settings.cache_dir).parent / "scratch"
        sweep_scratch(scratch)
        self._scratch = scratch / str(os.getpid())
        self._runtime = WasmRuntime(
            cache_dir=Path(settings.cache_dir) / "wasm",
            wasi_nn=WasiNn.if_available(onnx),
            scratch_root=self._scratch,
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
        remove_tree(self._scratch)


def sweep_scratch(root: Path) -> None:
    """Remove the scratch directories of workers that are gone (killed mid-job, or crashed):
    a job's files must not outlive it. Directories are named by worker pid; a live worker's are
    left alone, so starting a replacement worker never disturbs its siblings' jobs."""
    with contextlib.suppress(FileNotFoundError):
        for entry in root.iterdir():
            if not (entry.name.isdigit() and _alive(int(entry.name))):
                remove_tree(entry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        # A reused pid of a worker that died: this process has not run a job yet.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not one of our workers, but be safe
        return True
    return True
