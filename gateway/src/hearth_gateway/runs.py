"""Migratable runs on this gateway: which are in flight, and steering them (docs/migration.md).

A run is a job to the rest of the daemon (journal, admission, workers); this module only knows
which of the jobs in flight are runs, so that a device can steer its own runs
(``run_control``), and the gateway can send them back to their devices when it stops or is
overloaded. It steers a running run through its worker (a ``RunSignal`` frame after the run's
work item; hearth_gateway.runners.migrate): the run stops or checkpoints at its next migration
point. A run asked to stop while still queued stops as soon as a worker takes it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from hearth.errors import ErrorCode, ProtocolError
from hearth.protocol import (
    RunCheckpoint,
    RunChunk,
    RunMoved,
    RunResume,
    RunRound,
    RunStart,
    decode_reply,
)
from hearth.protocol import encode as encode_message
from hearth_gateway.workers import QueuedJob

__all__ = [
    "REASON_DEVICE",
    "REASON_OVERLOADED",
    "REASON_STOPPING",
    "ActiveRun",
    "Runs",
    "in_pieces",
]

REASON_DEVICE = "asked by the device"
REASON_STOPPING = "gateway stopping"
REASON_OVERLOADED = "gateway overloaded"

# Hands an action ("pause", "checkpoint", "received" with its byte count) to the worker running
# a job: False if none does.
Steer = Callable[[QueuedJob, str, int], bool]


@dataclass(slots=True)
class ActiveRun:
    item: QueuedJob
    running: bool = False  # a worker has it (else it waits in the queue)
    started: float = field(default_factory=time.monotonic)
    reason: str = ""  # why it was asked to stop; "" while it runs on
    cancelled: bool = False


def _key(item: QueuedJob) -> tuple[str, str]:
    assert isinstance(item.job, RunStart | RunResume)
    return item.reply_to.client_id, item.job.run_id


class Runs:
    """The runs accepted and not yet answered, by (device, run id)."""

    def __init__(self, steer: Steer) -> None:
        self._active: dict[tuple[str, str], ActiveRun] = {}
        self._steer = steer

    def __len__(self) -> int:
        return len(self._active)

    def accepted(self, item: QueuedJob) -> None:
        self._active[_key(item)] = ActiveRun(item)

    def started(self, item: QueuedJob) -> None:
        """A worker took the run. One asked to stop while it waited stops at once."""
        active = self._get(item)
        if active is None:
            return
        active.running = True
        if active.reason:
            self._steer(item, "pause", 0)

    def ended(self, item: QueuedJob) -> ActiveRun | None:
        """The run's hop is over (answered, or its worker died)."""
        active = self._get(item)
        if active is not None:
            del self._active[_key(item)]
        return active

    def control(
        self, client_id: str, run_id: str, action: str, received: int = 0
    ) -> ErrorCode | None:
        """Steer a device's own run; ``no_run`` when it has no such run here. ``received``
        (flow control's acknowledgement) goes to its worker as it is."""
        active = self._active.get((client_id, run_id))
        if active is None:
            return ErrorCode.NO_RUN
        if action in ("checkpoint", "received"):
            if active.running:
                self._steer(active.item, action, received)
            return None
        active.cancelled = active.cancelled or action == "cancel"
        self._stop(active, REASON_DEVICE)
        return None

    def move_all(self, reason: str) -> int:
        """Ask every run to stop and go back to its device (the gateway is stopping)."""
        for active in self._active.values():
            self._stop(active, reason)
        return len(self._active)

    def move_oldest(self, reason: str) -> ActiveRun | None:
        """Ask the longest-running run that is not already leaving to go back to its device
        (the gateway is overloaded: it frees a worker for work that cannot move)."""
        staying = [a for a in self._active.values() if a.running and not a.reason]
        if not staying:
            return None
        oldest = min(staying, key=lambda a: a.started)
        self._stop(oldest, reason)
        return oldest

    def _stop(self, active: ActiveRun, reason: str) -> None:
        if active.reason:
            return
        active.reason = reason
        if active.running:
            self._steer(active.item, "pause", 0)

    def _get(self, item: QueuedJob) -> ActiveRun | None:
        if not isinstance(item.job, RunStart | RunResume):
            return None
        active = self._active.get(_key(item))
        return active if active is not None and active.item is item else None


def in_pieces(reply: bytes, max_message: int, max_chunk: int) -> list[bytes] | None:
    """A run's answer, checkpoint or pre-copy round too large for one message, as the messages
    that carry it (docs/protocol.md, ``run_chunk``): its snapshot (or round) in ``run_chunk``
    pieces of ``max_chunk`` bytes, then the message itself naming it by its sha256. None: it
    fits, or it carries no snapshot (the caller answers ``too_large``)."""
    if len(reply) <= max_message:
        return None
    try:
        decoded = decode_reply(reply)
    except ProtocolError:
        return None
    if isinstance(decoded, RunMoved | RunCheckpoint):
        data, fields = decoded.snapshot, ("snapshot", "snapshot_sha256")
    elif isinstance(decoded, RunRound):
        data, fields = decoded.round, ("round", "round_sha256")
    else:
        return None
    if not data:
        return None
    sha = hashlib.sha256(data).hexdigest()
    pieces = [
        encode_message(
            RunChunk(
                job_id=decoded.job_id,
                run_id=decoded.run_id,
                sha256=sha,
                size=len(data),
                offset=offset,
                data=data[offset : offset + max_chunk],
            )
        )
        for offset in range(0, len(data), max_chunk)
    ]
    emptied: dict[str, object] = {fields[0]: b"", fields[1]: sha}
    pieces.append(encode_message(msgspec.structs.replace(decoded, **emptied)))
    return pieces
