"""Policies are data: limits and quotas come from policies/*.toml. This module is the one place
that reads them and the one place that decides admission.

The defaults below are the embedded policy (the daemon runs without any file); the repo's
policies/default.toml spells out the same values, and a test keeps the two equal.
"""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from hearth.errors import ErrorCode
from hearth.runtime.limits import WasmLimits
from hearth_gateway.errors import ConfigError

__all__ = ["Admission", "LimitsPolicy", "OnnxPolicy", "Policy", "WasmPolicy", "load_policy"]

MiB = 1024 * 1024


class WasmPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fuel: int = 2_000_000_000  # wasm instructions (roughly) per job
    memory_bytes: int = 256 * MiB
    output_bytes: int = 8 * MiB  # stdout + stderr
    wall_timeout_s: float = 30.0  # backstop: the worker is killed past this

    def limits(self) -> WasmLimits:
        return WasmLimits(
            fuel=self.fuel, memory_bytes=self.memory_bytes, output_bytes=self.output_bytes
        )


class OnnxPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    wall_timeout_s: float = 60.0


class LimitsPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_message_bytes: int = 16 * MiB  # one MQTT payload (a job with its inputs, or a chunk)
    max_blob_bytes: int = 512 * MiB  # one module or model
    max_chunk_bytes: int = 4 * MiB  # data bytes per BlobChunk
    max_queue: int = 256  # jobs waiting or running, all clients together
    max_inflight_per_client: int = 64  # queued or running jobs of one device
    upload_idle_timeout_s: float = 60.0  # a half-sent blob is dropped after this
    answer_retention_s: float = 24 * 3600.0  # stored answers for duplicate job ids


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    wasm: WasmPolicy = WasmPolicy()
    onnx: OnnxPolicy = OnnxPolicy()
    limits: LimitsPolicy = LimitsPolicy()


def load_policy(paths: Iterable[Path]) -> Policy:
    """Merge TOML files (later files win, table by table, key by key) over the defaults."""
    merged: dict[str, Any] = msgspec.to_builtins(Policy())
    for path in paths:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"policy {path}: {exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"policy {path}: [{section}] must be a table")
            merged.setdefault(section, {}).update(values)
    try:
        return msgspec.convert(merged, Policy)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"policy: {exc}") from None


class Admission:
    """Counts queued-or-running jobs, globally and per client, and admits or refuses new ones.
    Thread-safe: the MQTT thread admits, worker lanes release."""

    def __init__(self, limits: LimitsPolicy) -> None:
        self._limits = limits
        self._lock = threading.Lock()
        self._total = 0
        self._per_client: dict[str, int] = {}

    def admit(self, client_id: str) -> ErrorCode | None:
        """None when admitted (the caller must ``release`` later), else the refusal code."""
        with self._lock:
            if self._total >= self._limits.max_queue:
                return ErrorCode.OVERLOADED
            current = self._per_client.get(client_id, 0)
            if current >= self._limits.max_inflight_per_client:
                return ErrorCode.QUOTA_EXCEEDED
            self._total += 1
            self._per_client[client_id] = current + 1
            return None

    def release(self, client_id: str) -> None:
        with self._lock:
            self._total -= 1
            left = self._per_client.get(client_id, 1) - 1
            if left:
                self._per_client[client_id] = left
            else:
                self._per_client.pop(client_id, None)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._total
