"""Placing a call that states what it needs (``requires=``) or may not run here
(``local=False``): every place is asked what it offers (``hearth.requirements``), those that
fall short are skipped with the reason, and the call goes to the first that qualifies: the
client's gateway, the other gateways it knows (``gateways=``), or this device.

A call that must be offloaded waits, up to its deadline, for a gateway that qualifies to
appear (one that is down, busy past the call's latency, or not yet known); one that may run
here and finds no gateway runs here if this device qualifies. When no place qualifies the call
fails with ``unsatisfiable``, naming every place and why it was skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from hearth._futures import running
from hearth.errors import ErrorCode, GatewayUnavailable, JobError
from hearth.placement import Estimates, Placement
from hearth.protocol import GatewayStatus, Requirements
from hearth.requirements import Offer, accelerator_classes, local_offer, unmet

__all__ = ["Choice", "Place", "choose", "gateway_offer", "send_first"]

T = TypeVar("T")
_POLL_S = 0.25  # how often a call that must be offloaded looks again for a gateway


class Place(Protocol):
    """A gateway the call may go to: the client itself, or one of its peers."""

    def gateway_reachable(self) -> bool: ...
    def private_refusal(self, private: bool) -> str | None: ...
    def gateway_status(self) -> GatewayStatus | None: ...
    def why_unreachable(self) -> str: ...


@dataclass
class Choice:
    targets: list[Any]  # places whose gateway qualifies, in the order to try them
    local: bool  # this device qualifies (and the call may run here)
    skipped: list[str]  # "gateway gw-a: no gpu accelerator (has cpu)", ...
    waited_s: float = 0.0

    def why_skipped(self) -> str:
        return f" (skipped: {'; '.join(self.skipped)})" if self.skipped else ""


def gateway_offer(status: GatewayStatus, latency_ms: float | None) -> Offer:
    """What a gateway offers, from its retained status (an older gateway's accelerators are
    derived from its providers)."""
    accelerators = tuple(status.accelerators) or accelerator_classes(status.providers)
    return Offer(accelerators, status.memory_mb, frozenset(status.capabilities), latency_ms)


def _survey(
    places: Sequence[Any],
    needs: Requirements | None,
    *,
    private: bool,
    local: tuple[bool, Sequence[str], float | None],
    estimates: Callable[[str], Estimates | None],
) -> Choice:
    """One look at every place. ``local``: (may run here, its providers, its latency)."""
    targets, skipped = [], []
    for place in places:
        name = "gateway"
        if not place.gateway_reachable():
            skipped.append(f"{name} unreachable: {place.why_unreachable()}")
            continue
        status = place.gateway_status()
        name = f"gateway {status.gateway_id}" if status is not None else name
        refusal = place.private_refusal(private)
        if refusal is not None:
            skipped.append(f"{name}: {refusal}")
            continue
        if status is None:
            targets.append(place)  # says nothing of itself: its admission decides
            continue
        measured = estimates(status.gateway_id)
        why = unmet(needs, gateway_offer(status, measured.edge_ms if measured else None))
        if why:
            skipped.append(f"{name}: {'; '.join(why)}")
        else:
            targets.append(place)
    allowed, providers, latency_ms = local
    local_ok = False
    if allowed:
        why = unmet(needs, local_offer(providers, latency_ms))
        local_ok = not why
        if why:
            skipped.append(f"this device: {'; '.join(why)}")
    return Choice(targets, local_ok, skipped)


def choose(
    places: Sequence[Any],
    needs: Requirements | None,
    *,
    mode: Placement,
    private: bool,
    local: tuple[bool, Sequence[str], float | None],
    estimates: Callable[[str], Estimates | None],
    deadline_s: float,
) -> Choice:
    """Where a call may go; waits up to ``deadline_s`` when it must be offloaded and no
    gateway qualifies yet. Raises JobError(unsatisfiable) when no place qualifies."""
    may_run_here = local[0] and mode is not Placement.EDGE
    local = (may_run_here, local[1], local[2])
    started = time.monotonic()
    if mode is Placement.LOCAL:
        places = []
    while True:
        choice = _survey(places, needs, private=private, local=local, estimates=estimates)
        choice.waited_s = time.monotonic() - started
        if choice.targets or choice.local:
            return choice
        if may_run_here or mode is Placement.LOCAL or choice.waited_s >= deadline_s:
            break
        time.sleep(_POLL_S)
    waited = f" after waiting {choice.waited_s:.1f} s" if choice.waited_s >= _POLL_S else ""
    what = "no place meets this call's requires" if needs is not None else "no gateway"
    if not may_run_here and mode is not Placement.LOCAL:
        what += " (offload is mandatory: local=False)"
    raise JobError(ErrorCode.UNSATISFIABLE, f"{what}{waited}: {'; '.join(choice.skipped)}")


def send_first(targets: Sequence[Any], send: Callable[[Any], Future[T]]) -> Future[T]:
    """Send to the first target; one that answers ``unsatisfiable`` (its own admission
    disagrees with its status) passes the call to the next."""
    outcome: Future[T] = running()

    def attempt(index: int, refused: list[str]) -> None:
        try:
            sent = send(targets[index])
        except Exception as exc:  # noqa: BLE001 - reported through the future
            outcome.set_exception(exc)
            return

        def done(future: Future[T]) -> None:
            exc = future.exception()
            unsatisfiable = isinstance(exc, JobError) and exc.code is ErrorCode.UNSATISFIABLE
            if unsatisfiable and index + 1 < len(targets):
                attempt(index + 1, [*refused, str(exc)])
            elif unsatisfiable and refused:
                message = "; ".join([*refused, str(exc)])
                outcome.set_exception(JobError(ErrorCode.UNSATISFIABLE, message))
            elif exc is not None:
                outcome.set_exception(exc)
            else:
                outcome.set_result(future.result())

        sent.add_done_callback(done)

    if not targets:
        outcome.set_exception(GatewayUnavailable("no gateway qualifies"))
    else:
        attempt(0, [])
    return outcome
