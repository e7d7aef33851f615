"""Hearth device SDK: find a home-edge gateway, offload WebAssembly and ONNX jobs to it, and run
the same jobs on the device when it is out of reach.

>>> import hearth                                             # doctest: +SKIP
>>> gateways = hearth.discover()
>>> with hearth.Client(gateways[0]) as client:
...     run = client.run_wasm("filter.wasm", stdin=frame, args=["edges"])
...     print(run.where, run.reason, f"{run.latency_ms:.1f} ms")
"""

from hearth.client import Client, Inference, WasmRun
from hearth.discovery import GatewayInfo, discover
from hearth.errors import (
    ErrorCode,
    GatewayIdentityChanged,
    GatewayUnavailable,
    HearthError,
    JobError,
    LocalRuntimeUnavailable,
    NotPaired,
    ProtocolError,
    QuotaExceeded,
    RequirementsError,
)
from hearth.placement import Placement
from hearth.vision import Call, CameraStream, Dropped, OdometrySession, PipelineRun


def __getattr__(name: str) -> str:
    """``__version__``, read when first asked for: importlib.metadata costs about a fifth of
    the import time every ``hearth`` command pays before it starts its job."""
    if name != "__version__":
        raise AttributeError(f"module 'hearth' has no attribute {name!r}")
    from importlib import metadata

    try:  # one place for the version: device-sdk/pyproject.toml, from the installed metadata
        version = metadata.version("hearth-device-sdk")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        version = "0+unknown"
    globals()["__version__"] = version
    return version


__all__ = [
    "Call",
    "CameraStream",
    "Client",
    "Dropped",
    "ErrorCode",
    "GatewayIdentityChanged",
    "GatewayInfo",
    "GatewayUnavailable",
    "HearthError",
    "Inference",
    "JobError",
    "LocalRuntimeUnavailable",
    "NotPaired",
    "OdometrySession",
    "PipelineRun",
    "Placement",
    "ProtocolError",
    "QuotaExceeded",
    "RequirementsError",
    "WasmRun",
    "__version__",
    "discover",
]
