"""Runtimes that execute jobs in this process: WebAssembly (wasmtime) and ONNX (onnxruntime).

The device SDK runs them for local placement and fallback; the gateway's worker processes run
the very same code, so a module behaves the same wherever it lands. They need the ``local``
extra; importing this package without it raises LocalRuntimeUnavailable only on use.
"""

import importlib.util

from hearth.runtime.limits import WasmLimits

__all__ = ["WasmLimits", "installed"]


def installed(name: str) -> bool:
    """Whether a package is installed, without importing it (so without its start-up cost)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # an import hook that refuses it, a broken package
        return False
