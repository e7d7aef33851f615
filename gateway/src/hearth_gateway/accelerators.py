"""Which accelerators this box has, as onnxruntime sees them. Picking the provider order is the
SDK runtime's job (hearth.runtime.onnx.select_providers); this module only reports."""

from __future__ import annotations

from hearth.runtime.onnx import select_providers

__all__ = ["accelerator_names", "available_providers"]

_SHORT = {
    "TensorrtExecutionProvider": "tensorrt",
    "CUDAExecutionProvider": "cuda",
    "OpenVINOExecutionProvider": "openvino",
    "CoreMLExecutionProvider": "coreml",
    "DmlExecutionProvider": "directml",
    "CPUExecutionProvider": "cpu",
}


def available_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return select_providers(ort.get_available_providers())


def accelerator_names(providers: list[str]) -> list[str]:
    """Short names for status and mDNS: ["cuda", "cpu"]."""
    return [_SHORT.get(p, p.removesuffix("ExecutionProvider").lower()) for p in providers]
