"""Hearth device SDK: find a home-edge gateway, offload WebAssembly and ONNX jobs to it, and run
the same jobs on the device when it is out of reach.

>>> import hearth                                             # doctest: +SKIP
>>> gateways = hearth.discover()
>>> with hearth.Client(gateways[0]) as client:
...     run = client.run_wasm("filter.wasm", stdin=frame, args=["edges"])
...     print(run.where, run.reason, f"{run.latency_ms:.1f} ms")
"""

from importlib import metadata as _metadata

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

try:  # one place for the version: device-sdk/pyproject.toml, read from the installed metadata
    __version__ = _metadata.version("hearth-device-sdk")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

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
