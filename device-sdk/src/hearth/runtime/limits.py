"""Sandbox limits for one WebAssembly run. The gateway fills them from policies/*.toml; the SDK
uses the defaults below for local runs."""

from __future__ import annotations

import msgspec

__all__ = ["WasmLimits"]


class WasmLimits(msgspec.Struct, frozen=True, kw_only=True):
    # Fuel is wasmtime's deterministic instruction budget: ~1 unit per wasm instruction, so
    # 2e9 is a few seconds of work on a home PC and bounds infinite loops without a clock.
    fuel: int = 2_000_000_000
    memory_bytes: int = 256 * 1024 * 1024  # linear memory, all memories together
    output_bytes: int = 8 * 1024 * 1024  # stdout + stderr together
    # Files left in the run's /scratch directory, checked when the run ends.
    scratch_bytes: int = 64 * 1024 * 1024
