"""Whether a job's ``requires`` (docs/quotas.md) fits this gateway: its accelerator classes,
the memory one job may use here, its capabilities, and the latency it can offer now (its recent
run times and its queue). A job that does not fit is refused ``unsatisfiable`` before anything
is stored, with every requirement it misses in the message, so the device tries elsewhere.

The words come from the SDK's ``hearth.requirements.unmet``: device and gateway say the same
thing about a place that does not qualify.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from hearth.protocol import Requirements
from hearth.requirements import Offer, accelerator_classes, unmet

__all__ = ["Fit", "Resources"]

_ALPHA = 0.2  # weight of the newest run time in the moving average
MiB = 1 << 20


@dataclass(frozen=True)
class Resources:
    """What this gateway has, as its configuration and policy say."""

    providers: tuple[str, ...] = ()  # onnxruntime providers, full names
    declared: tuple[str, ...] = ()  # accelerator classes the owner declared (config)
    capabilities: frozenset[str] = frozenset()
    job_memory_bytes: int = 0  # one worker's memory bound (policy); 0: the machine's memory
    wasm_memory_bytes: int = 0  # one WebAssembly job's linear memory (policy)

    @property
    def accelerators(self) -> tuple[str, ...]:
        found = list(accelerator_classes(self.providers))
        found += [a for a in self.declared if a not in found]
        return tuple(found)

    @property
    def memory_mb(self) -> int:
        """Memory one job may use here, MiB."""
        limit = self.job_memory_bytes or _physical_bytes()
        return limit // MiB


class Fit:
    def __init__(self, resources: Callable[[], Resources], load: Callable[[], float]) -> None:
        self._resources = resources  # read per job: capabilities arrive once workers start
        self._load = load  # jobs waiting per worker, now
        self._run_ms: float | None = None  # moving average of run times here

    def ran(self, seconds: float) -> None:
        """A job's run time here, for the latency this gateway can offer."""
        ms = seconds * 1e3
        self._run_ms = ms if self._run_ms is None else (1 - _ALPHA) * self._run_ms + _ALPHA * ms

    def refusal(self, needs: Requirements, wasm: bool) -> str | None:
        """Why a job with ``needs`` does not fit here (every reason), or None."""
        res = self._resources()
        memory_mb = res.memory_mb
        if wasm and res.wasm_memory_bytes:
            memory_mb = min(memory_mb, res.wasm_memory_bytes // MiB)
        latency = None if self._run_ms is None else self._run_ms * (1 + self._load())
        offer = Offer(res.accelerators, memory_mb, res.capabilities, latency)
        why = unmet(needs, offer)
        return "; ".join(why) if why else None


def _physical_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
