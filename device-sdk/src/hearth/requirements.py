"""What a call needs of wherever it runs (``requires=``), and whether a place meets it: pure
logic, shared by the SDK's placement and the gateway's admission (which imports it).

>>> needs = requirements({"accelerator": "gpu", "memory_mb": 512})
>>> unmet(needs, Offer(accelerators=("cpu",), memory_mb=4096))
['no gpu accelerator (has cpu)']

A place is described by an ``Offer``: its accelerator classes, the memory one job may use, the
capabilities it provides and its expected latency for this call. ``unmet`` lists, in words,
every requirement it fails; an empty list means it qualifies. Those words are what a result's
``reason`` and a gateway's ``unsatisfiable`` error say about a place that was skipped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec

from hearth.errors import RequirementsError
from hearth.protocol import Requirements

__all__ = [
    "Offer",
    "Requirements",
    "accelerator_classes",
    "app_name",
    "local_offer",
    "requirements",
    "unmet",
]

_APP = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# onnxruntime providers' short names (as status and mDNS show them) -> accelerator class.
_CLASSES = {
    "cpu": "cpu",
    "cuda": "gpu",
    "tensorrt": "gpu",
    "rocm": "gpu",
    "migraphx": "gpu",
    "dml": "gpu",
    "coreml": "npu",
    "qnn": "npu",
    "vitisai": "npu",
}


def requirements(value: Requirements | Mapping[str, object] | None) -> Requirements | None:
    """``requires=`` as a call gives it, checked here, before anything is sent: unknown keys,
    wrong types and absurd values (negative memory, a latency of 0 or 1e12 ms, an accelerator
    nobody has) raise RequirementsError (a ValueError)."""
    if value is None or isinstance(value, Requirements):
        return value
    if not isinstance(value, Mapping):
        raise RequirementsError(f"requires must be a mapping, not {type(value).__name__}")
    try:
        return msgspec.convert(dict(value), Requirements)
    except msgspec.ValidationError as exc:
        raise RequirementsError(f"requires: {exc}") from None


def app_name(app: str | None) -> str | None:
    """``app=`` checked here (letters, digits, ``_.-``, 1 to 64): None stays None (the
    gateway counts the device's id)."""
    if app is None:
        return None
    if not isinstance(app, str) or not _APP.fullmatch(app):
        raise RequirementsError(f"app {app!r}: 1 to 64 of A-Z a-z 0-9 _ . -")
    return app


def accelerator_classes(providers: Iterable[str]) -> tuple[str, ...]:
    """Accelerator classes ("cpu", "gpu", "npu") of onnxruntime providers, by full name
    ("CUDAExecutionProvider") or short ("cuda"). OpenVINO's device is named by its options
    (HEARTH_OPENVINO_DEVICE=GPU|NPU); without them it runs on the CPU."""
    found = ["cpu"]
    for provider in providers:
        short = provider.removesuffix("ExecutionProvider").lower()
        kind = _CLASSES.get(short)
        if short == "openvino":
            device = os.environ.get("HEARTH_OPENVINO_DEVICE", "CPU").upper()
            kind = (
                "gpu" if device.startswith("GPU") else "npu" if device.startswith("NPU") else None
            )
        if kind is not None and kind not in found:
            found.append(kind)
    return tuple(found)


@dataclass(frozen=True)
class Offer:
    """What one place (a gateway, this device) offers a call."""

    accelerators: tuple[str, ...] = ("cpu",)
    memory_mb: int = 0  # memory one job may use, MiB; 0: not said (not held against it)
    capabilities: frozenset[str] = frozenset()
    latency_ms: float | None = None  # expected for this call; None: not measured yet


def unmet(needs: Requirements | None, offer: Offer) -> list[str]:
    """Every requirement ``offer`` fails, in words (empty: it qualifies)."""
    if needs is None:
        return []
    why = []
    if needs.accelerator is not None and needs.accelerator not in offer.accelerators:
        why.append(f"no {needs.accelerator} accelerator (has {', '.join(offer.accelerators)})")
    if needs.memory_mb is not None and offer.memory_mb and needs.memory_mb > offer.memory_mb:
        why.append(f"{needs.memory_mb} MiB wanted, {offer.memory_mb} MiB per job there")
    if needs.capability is not None and needs.capability not in offer.capabilities:
        why.append(f"no capability {needs.capability}")
    latency = offer.latency_ms
    if needs.max_latency_ms is not None and latency is not None and latency > needs.max_latency_ms:
        why.append(f"expected {latency:.0f} ms, over max_latency_ms {needs.max_latency_ms:g}")
    return why


def local_offer(providers: Iterable[str], latency_ms: float | None) -> Offer:
    """This device: its onnxruntime providers, its physical memory, no capabilities (those
    are the gateway's native code)."""
    try:
        memory_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
    except (ValueError, OSError):
        memory_mb = 0
    return Offer(accelerator_classes(providers), memory_mb, frozenset(), latency_ms)
