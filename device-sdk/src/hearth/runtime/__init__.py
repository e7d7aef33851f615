"""Runtimes that execute jobs in this process: WebAssembly (wasmtime) and ONNX (onnxruntime).

The device SDK runs them for local placement and fallback; the gateway's worker processes run
the very same code, so a module behaves the same wherever it lands. They need the ``local``
extra; importing this package without it raises LocalRuntimeUnavailable only on use.
"""

from hearth.runtime.limits import WasmLimits

__all__ = ["WasmLimits"]
