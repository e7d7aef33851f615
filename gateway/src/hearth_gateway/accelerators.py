"""Which accelerators this box has, and which execution provider runs each model.

The provider order is the SDK runtime's (hearth.runtime.onnx.select_providers). What this module
adds is the *per-model* decision, kept on disk so that every worker and every restart share it:

- a provider that refuses a model (session creation fails), gets it wrong (outputs that differ
  from the CPU provider's on the model's first real input) or is slower than the CPU provider on
  that input is not used for that model; the next one is (the CPU provider last, always);
- a provider that kills the worker while loading or trying a model (a crash in native code)
  is refused for it too: an attempt leaves a marker file with the worker's pid, removed when
  the attempt returns, and a marker whose process is gone is read as that crash;
- decisions are kept per provider *package* (``onnxruntime-openvino 1.24.1``) and provider
  options, so an upgrade or a different device tries again.

The runtime that applies these decisions is hearth_gateway.runners.accelerated.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from hearth.runtime.onnx import select_providers

__all__ = [
    "CPU",
    "ChoiceCache",
    "Decision",
    "accelerator_names",
    "available_providers",
    "box_devices",
    "outputs_disagree",
    "provider_options",
    "provider_package",
]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"

_SHORT = {
    "TensorrtExecutionProvider": "tensorrt",
    "CUDAExecutionProvider": "cuda",
    "OpenVINOExecutionProvider": "openvino",
    "CoreMLExecutionProvider": "coreml",
    "DmlExecutionProvider": "directml",
    CPU: "cpu",
}

# Provider options an owner may set without touching code, as the OpenVINO and CUDA providers
# name them: which device the provider uses ("CPU", "GPU", "NPU", "GPU.1"; a CUDA device id).
_OPTION_ENV = {
    "OpenVINOExecutionProvider": ("HEARTH_OPENVINO_DEVICE", "device_type"),
    "CUDAExecutionProvider": ("HEARTH_CUDA_DEVICE", "device_id"),
    "TensorrtExecutionProvider": ("HEARTH_CUDA_DEVICE", "device_id"),
}

# How far an accelerator's outputs may stray from the CPU provider's before they count as wrong:
# relative to the largest CPU output, so a probability map and raw logits are judged alike. An
# fp16 or bf16 device lands well inside this; a provider that miscompiles a model does not.
_RTOL = 0.02
_ATOL = 1e-4
_MAX_LABEL_MISMATCH = 0.01  # of the elements of an integer output (labels, indices)


def available_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return select_providers(ort.get_available_providers())


def accelerator_names(providers: list[str]) -> list[str]:
    """Short names for status and mDNS: ["cuda", "cpu"]."""
    return [_SHORT.get(p, p.removesuffix("ExecutionProvider").lower()) for p in providers]


def provider_package() -> str:
    """The distribution that provides ``import onnxruntime`` and its version, e.g.
    ``"onnxruntime-openvino 1.24.1"`` (the GPU, OpenVINO and plain builds share the import)."""
    dists = importlib.metadata.packages_distributions().get("onnxruntime", [])
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{dist} {importlib.metadata.version(dist)}"
    try:
        import onnxruntime as ort
    except ImportError:
        return "none"
    return f"onnxruntime {ort.__version__}"


def provider_options(env: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Options for each provider from the environment (``HEARTH_OPENVINO_DEVICE=GPU``)."""
    env = os.environ if env is None else env
    options: dict[str, dict[str, str]] = {}
    for provider, (variable, key) in _OPTION_ENV.items():
        value = env.get(variable, "").strip()
        if value:
            options[provider] = {key: value}
    return options


class Decision(msgspec.Struct, kw_only=True):
    """Which provider runs one model under one provider package, and why."""

    provider: str
    package: str
    refused: dict[str, str] = {}  # provider -> why it is not used for this model
    p50_ms: dict[str, float] = {}  # provider -> measured on the model's first input
    decided_at: float = 0.0


class ChoiceCache:
    """Decisions on disk, one JSON file per model, in a folder per provider package and options:
    ``<cache_dir>/providers/<package>-<options hash>/<sha256>.json``. Written atomically; any
    worker may decide a model, the last to finish wins (they measure the same thing)."""

    def __init__(self, cache_dir: Path, package: str, options: Mapping[str, Any]) -> None:
        self.package = package
        self.root = cache_dir / "providers" / _key(package, options)

    def get(self, sha256: str) -> Decision | None:
        try:
            return msgspec.json.decode((self.root / f"{sha256}.json").read_bytes(), type=Decision)
        except (OSError, msgspec.DecodeError):
            return None

    def put(self, sha256: str, decision: Decision) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{sha256}.{os.getpid()}.tmp"
        tmp.write_bytes(msgspec.json.encode(decision))
        tmp.replace(self.root / f"{sha256}.json")

    @contextlib.contextmanager
    def attempt(self, sha256: str, provider: str) -> Iterator[None]:
        """Mark an attempt to load or run ``sha256`` on ``provider`` while it lasts. An
        exception removes the marker too: only a dead process leaves one behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / f"{sha256}.{provider}.trying"
        marker.write_text(str(os.getpid()))
        try:
            yield
        finally:
            marker.unlink(missing_ok=True)

    def crashed(self, sha256: str) -> dict[str, str]:
        """Providers whose attempt on ``sha256`` ended with its process (markers left by dead
        pids); the markers are consumed."""
        found: dict[str, str] = {}
        for marker in self.root.glob(f"{sha256}.*.trying"):
            provider = marker.name[len(sha256) + 1 : -len(".trying")]
            try:
                pid = int(marker.read_text() or 0)
            except (OSError, ValueError):
                continue
            if pid != os.getpid() and not _alive(pid):
                found[provider] = "the worker died while loading or running the model on it"
                marker.unlink(missing_ok=True)
        return found

    def choices(self) -> dict[str, str]:
        """sha256 -> provider for every model decided here (what status shows)."""
        found: dict[str, str] = {}
        with contextlib.suppress(OSError):
            for path in sorted(self.root.glob("*.json")):
                decision = self.get(path.stem)
                if decision is not None:
                    found[path.stem] = decision.provider
        return found

    @classmethod
    def for_box(cls, cache_dir: Path) -> ChoiceCache:
        """The decisions of this box's provider package and options."""
        return cls(cache_dir, provider_package(), provider_options())


def outputs_disagree(reference: Sequence[Any], candidate: Sequence[Any]) -> str | None:
    """Why ``candidate`` (an accelerator's outputs) is not ``reference`` (the CPU provider's),
    or None when they agree. Non-array outputs (a classifier's ZipMap) are not compared."""
    import numpy as np

    if len(reference) != len(candidate):
        return f"{len(candidate)} outputs instead of {len(reference)}"
    for index, (want, got) in enumerate(zip(reference, candidate, strict=True)):
        if not (isinstance(want, np.ndarray) and isinstance(got, np.ndarray)):
            continue
        if want.shape != got.shape:
            return f"output {index} has shape {list(got.shape)}, not {list(want.shape)}"
        if want.size == 0:
            continue
        if np.issubdtype(want.dtype, np.floating):
            scale = float(np.max(np.abs(want)))
            error = float(np.max(np.abs(want.astype(np.float64) - got.astype(np.float64))))
            if not error <= _ATOL + _RTOL * scale:  # also catches NaN
                return f"output {index} differs from the CPU provider's by {error:.3g}"
        elif float(np.mean(want != got)) > _MAX_LABEL_MISMATCH:
            return f"output {index} differs from the CPU provider's in {np.mean(want != got):.1%}"
    return None


def box_devices() -> dict[str, list[str]]:
    """What accelerator hardware this box shows, whatever package is installed: ``intel_gpu``
    (DRM render nodes of the i915/xe drivers), ``npu`` (/dev/accel), ``nvidia`` (the driver's
    GPU list), and ``openvino`` (the devices the installed OpenVINO provider sees)."""
    found: dict[str, list[str]] = {"intel_gpu": [], "npu": [], "nvidia": [], "openvino": []}
    for node in sorted(Path("/dev/dri").glob("renderD*")):
        driver = Path("/sys/class/drm") / node.name / "device" / "driver"
        with contextlib.suppress(OSError):
            if driver.resolve().name in {"i915", "xe"}:
                found["intel_gpu"].append(str(node))
    found["npu"] = [str(p) for p in sorted(Path("/dev/accel").glob("accel*"))]
    with contextlib.suppress(OSError):
        for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
            model = re.search(r"^Model:\s*(.+)$", info.read_text(), re.MULTILINE)
            found["nvidia"].append(model.group(1).strip() if model else info.parent.name)
    found["openvino"] = _openvino_devices()
    return found


def _openvino_devices() -> list[str]:
    try:
        from onnxruntime.capi import _pybind_state
    except ImportError:
        return []
    devices = getattr(_pybind_state, "get_available_openvino_device_ids", None)
    if devices is None:  # not the OpenVINO build
        return []
    try:
        return [str(d) for d in devices()]
    except Exception:  # a broken OpenVINO install: it sees no device
        log.debug("OpenVINO device query failed", exc_info=True)
        return []


def _key(package: str, options: Mapping[str, Any]) -> str:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", package).strip("-") or "none"
    digest = hashlib.sha256(msgspec.json.encode(dict(sorted(options.items())))).hexdigest()
    return f"{slug}-{digest[:8]}"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
