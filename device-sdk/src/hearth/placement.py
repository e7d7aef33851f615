"""Where to run a call: pure decision logic, no I/O, so it is unit-tested on its own.

``auto`` offloads when a gateway is reachable and its measured time for this job (transfer +
queue + run, as seen from the device) beats the measured local time. The first call on each side
is a warm-up (it pays the upload and compilation once) and is not counted; until both sides have
a measurement, calls go where one is missing. Every decision carries a human-readable reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Decision", "Estimates", "Placement", "decide"]


class Placement(enum.StrEnum):
    AUTO = "auto"
    EDGE = "edge"
    LOCAL = "local"
    # Device and gateway at once; the first answer wins (to hide a gateway that stalls). Only
    # for work without side effects: every WASM and ONNX job is; tasks never are.
    HEDGE = "hedge"


# Re-measure the slower side every this many calls, so a gateway that got busy (or idle) or a
# device that warmed up is noticed.
REPROBE_EVERY = 25
_ALPHA = 0.3  # weight of the newest sample in the moving average


@dataclass
class Estimates:
    """Exponentially weighted latency estimates (ms) for one job key (kind + module hash)."""

    local_ms: float | None = None
    edge_ms: float | None = None
    calls: int = 0
    warmed: set[str] = field(default_factory=set)  # sides whose warm-up call is done
    # Calls made by earlier processes, when these estimates were loaded from the device's
    # store of known gateways (hearth._known): the reasons then say so.
    stored_calls: int = 0

    def record(self, where: str, ms: float) -> None:
        if where not in self.warmed:
            self.warmed.add(where)  # one-off costs (upload, compile): not representative
            return
        old = self.local_ms if where == "local" else self.edge_ms
        new = ms if old is None else (1 - _ALPHA) * old + _ALPHA * ms
        if where == "local":
            self.local_ms = new
        else:
            self.edge_ms = new


@dataclass(frozen=True)
class Decision:
    where: str  # "edge" | "local"
    reason: str
    fallback_ok: bool = field(default=True)  # may an edge failure fall back to local?


def decide(  # noqa: PLR0911 - one return per rule reads best here
    mode: Placement,
    *,
    gateway: bool,
    local: bool,
    estimates: Estimates,
) -> Decision:
    if mode is Placement.LOCAL:
        return Decision("local", "placement=local", fallback_ok=False)
    if mode is Placement.EDGE:
        return Decision("edge", "placement=edge", fallback_ok=False)
    if mode is Placement.HEDGE and gateway and local:
        return Decision("hedge", "placement=hedge: on the device and the gateway at once")
    if not local:
        # Nothing to fall back to: try the gateway, and let its absence be the error.
        return Decision("edge", "no local runtime on this device", fallback_ok=False)
    if not gateway:
        return Decision("local", "no gateway reachable")
    edge, here = estimates.edge_ms, estimates.local_ms
    earlier = f"stored from {estimates.stored_calls} earlier calls"
    note = f" ({earlier})" if estimates.stored_calls else ""
    if edge is None:
        step = "warm-up" if "edge" not in estimates.warmed else "measuring"
        return Decision("edge", f"{step}: timing the gateway{note}")
    if here is None:
        step = "warm-up" if "local" not in estimates.warmed else "measuring"
        return Decision("local", f"{step}: timing this device{note}")
    faster, slower = ("edge", "local") if edge <= here else ("local", "edge")
    stored = f"; {earlier}" if estimates.stored_calls else ""
    if estimates.calls and estimates.calls % REPROBE_EVERY == 0:
        return Decision(slower, f"re-measuring {slower} (every {REPROBE_EVERY} calls{stored})")
    return Decision(
        faster,
        f"edge {edge:.1f} ms {'<=' if faster == 'edge' else '>'} local {here:.1f} ms "
        f"(measured{stored})",
    )
