"""What a call returns, wherever it ran, and the client's counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hearth.protocol import Timing

__all__ = ["Inference", "Stats", "WasmRun"]


@dataclass(frozen=True)
class WasmRun:
    """The result of ``run_wasm``: what the module did, and where and why it ran there."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    where: str  # "edge" | "local"
    reason: str
    latency_ms: float
    job_id: str
    gateway_id: str | None = None
    timing: Timing | None = None  # the gateway's queue and run time, when it ran there


@dataclass(frozen=True)
class Inference:
    """The result of ``infer``: named output arrays, and where and why it ran there."""

    outputs: dict[str, Any]  # name -> numpy array
    provider: str
    where: str
    reason: str
    latency_ms: float
    job_id: str
    gateway_id: str | None = None
    timing: Timing | None = None


@dataclass
class Stats:
    edge_calls: int = 0
    local_calls: int = 0
    fallbacks: int = 0
    blob_uploads: int = 0
    blob_bytes_sent: int = 0
    retries: int = 0  # attempts after a timeout, under the same job id
    resent: int = 0  # jobs sent again after the gateway came back from a loss
    hedged: int = 0  # calls run on both sides at once (placement="hedge")
    hedge_local_wins: int = 0  # of those, the ones this device answered first
