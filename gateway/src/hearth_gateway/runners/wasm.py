"""The WebAssembly runner: WASI command modules via the SDK's runtime (the same code a device
runs locally), with compiled modules cached on disk by hash. Modules that import wasi-nn run
their models on this box's execution providers, chosen as for ONNX jobs.

Each job whose module can reach a directory (hearth.runtime.wasm) gets a fresh ``/scratch``
directory under ``<state>/scratch/<worker pid>/``; what the job leaves there is removed when it
ends, and what a crashed worker left behind is removed by the next worker to start.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hearth.protocol import Described, Reply, WasmExport, WasmImport, WasmJob, WasmResult
from hearth.runtime.wasi_nn import WasiNn
from hearth.runtime.wasm import WasmRuntime, remove_tree
from hearth_gateway.runners import Inspect, WorkerSettings, WorkItem, onnx_runtime

__all__ = ["WasmRunner"]


class WasmRunner:
    def __init__(self, settings: WorkerSettings) -> None:
        self._limits = settings.wasm_limits
        # The cache directory sits in the gateway's state directory; scratch goes beside it.
        scratch = Path(settings.cache_dir).parent / "scratch"
        sweep_scratch(scratch)
        self._scratch = scratch / str(os.getpid())
        self._runtime = WasmRuntime(
            cache_dir=Path(settings.cache_dir) / "wasm",
            # onnxruntime is imported on a module's first wasi-nn load, not at worker start.
            wasi_nn=WasiNn.if_available(lambda: onnx_runtime(settings)),
            scratch_root=self._scratch,
        )

    def run(self, item: WorkItem) -> Reply:
        job = item.job
        if isinstance(job, Inspect):
            return self._describe(job, Path(item.blob_path))
        assert isinstance(job, WasmJob)
        outcome = self._runtime.run(
            job.module,
            args=job.args,
            stdin=job.stdin,
            limits=self._limits,
            path=Path(item.blob_path),
        )
        return WasmResult(
            job_id=job.job_id,
            exit_code=outcome.exit_code,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
        )

    def _describe(self, job: Inspect, path: Path) -> Described:
        """A module's imports and exports, from the module as a job would compile it (the
        compiled module stays cached for the jobs that follow)."""
        module = self._runtime.module(job.blob, path=path)
        return Described(
            job_id=job.job_id,
            blob=job.blob,
            kind="wasm",
            imports=[
                WasmImport(module=i.module, name=i.name or "", kind=_kind(i.type))
                for i in module.imports
            ],
            exports=[WasmExport(name=e.name, kind=_kind(e.type)) for e in module.exports],
        )

    def describe(self) -> dict[str, list[str]]:
        return {}

    def close(self) -> None:
        self._runtime.close()
        remove_tree(self._scratch)


def _kind(extern_type: object) -> str:
    """wasmtime's FuncType, MemoryType, TableType, GlobalType: "func", "memory", ..."""
    return type(extern_type).__name__.removesuffix("Type").lower()


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
