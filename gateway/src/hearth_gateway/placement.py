"""Where work may run: the one place that decides, from a job's data label and the
``[placement]`` policy, and the one check that every message bound for an upstream passes.

The rules::

    private  this gateway only: run now, or wait in its queue. Never forwarded, whatever the
             load; a job this gateway cannot run fails with ``policy_denied`` when an upstream
             is configured (it could have gone there, were it public), else ``unsupported``.
             A cloud-tier gateway refuses every private job with ``policy_denied``: a second
             line of defence behind the home gateway and the device SDK.
    public   this gateway, or the upstream gateway when this one is saturated (every worker
             busy and more than ``upstream_when_queue_over`` jobs waiting) or lacks the job's
             runner, and the upstream is connected and under ``upstream_max_in_flight``.

Peer gateways on the LAN are not considered: private work runs here or nowhere.

``decide`` and ``egress_refusal`` are pure; ``Placer`` gathers their inputs from the running
gateway and writes every decision and refusal to the audit table.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Literal

from hearth.errors import ErrorCode, ProtocolError
from hearth.protocol import (
    BlobChunk,
    CallJob,
    DataClass,
    OnnxJob,
    PipelineJob,
    WasmJob,
    decode_request,
    request_topic,
)
from hearth_gateway.policy import PlacementPolicy
from hearth_gateway.runners import runner_for
from hearth_gateway.store import Store

__all__ = [
    "Action",
    "Decision",
    "Load",
    "Placer",
    "Tier",
    "UpstreamState",
    "connection_refusal",
    "decide",
    "egress_refusal",
    "forwardable",
]

Tier = Literal["home", "cloud"]
PlacedJob = WasmJob | OnnxJob | CallJob | PipelineJob


class Action(enum.StrEnum):
    HERE = "here"  # on this gateway, a worker is free
    QUEUE = "queue"  # on this gateway, after the jobs ahead of it
    UPSTREAM = "upstream"  # forwarded to the upstream gateway
    DENY = "deny"  # refused with ``code``


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    target: str = ""  # the upstream's address when forwarded
    code: ErrorCode | None = None  # when denied

    @property
    def where(self) -> str:
        """The audit table's target column."""
        if self.action is Action.UPSTREAM:
            return f"upstream {self.target}"
        return "-" if self.action is Action.DENY else "here"


@dataclass(frozen=True, slots=True)
class Load:
    workers: int
    busy: int
    waiting: int  # queued for a worker

    def saturated(self, queue_over: int) -> bool:
        return self.busy >= self.workers and self.waiting > queue_over


@dataclass(frozen=True, slots=True)
class UpstreamState:
    target: str = ""  # the upstream's address; "" when none is configured
    ready: bool = False  # connected, its gateway known, room under upstream_max_in_flight


def forwardable(job: object) -> bool:
    """Jobs that carry everything they need: a stream frame or a session call depends on
    state held by one worker here, so it is never forwarded."""
    if isinstance(job, CallJob):
        return job.stream is None and job.session is None
    return isinstance(job, WasmJob | OnnxJob | PipelineJob)


def decide(  # noqa: PLR0911 - one return per rule reads best
    *,
    data_class: DataClass,
    tier: Tier,
    runner: str,
    runner_here: bool,
    can_forward: bool,
    load: Load,
    upstream: UpstreamState,
    policy: PlacementPolicy,
) -> Decision:
    """Where one job runs. ``can_forward``: the job is ``forwardable``."""
    if data_class != "public":
        if tier == "cloud":
            return Decision(
                Action.DENY,
                "private work never runs on a cloud-tier gateway",
                code=ErrorCode.POLICY_DENIED,
            )
        if not runner_here:
            if upstream.target:
                return Decision(
                    Action.DENY,
                    f"private work stays on this gateway, which has no {runner!r} runner; "
                    "it is never forwarded upstream",
                    code=ErrorCode.POLICY_DENIED,
                )
            return _unsupported(runner)
        return _here(load, "private: stays on this gateway")
    may_forward = (
        can_forward and tier == "home" and upstream.ready and policy.upstream_max_in_flight > 0
    )
    if not runner_here:
        if may_forward:
            return Decision(
                Action.UPSTREAM,
                f"public, and this gateway has no {runner!r} runner",
                upstream.target,
            )
        return _unsupported(runner)
    if load.saturated(policy.upstream_when_queue_over):
        busy = f"{load.busy}/{load.workers} workers busy, {load.waiting} jobs waiting"
        if may_forward:
            return Decision(
                Action.UPSTREAM, f"public, and this gateway is saturated ({busy})", upstream.target
            )
        if upstream.target and can_forward:
            return _here(load, "public; saturated, but the upstream is not available")
    return _here(load, "public")


def _here(load: Load, why: str) -> Decision:
    if load.busy < load.workers and load.waiting == 0:
        return Decision(Action.HERE, f"{why}; a worker is free")
    return Decision(
        Action.QUEUE, f"{why}; {load.waiting} jobs ahead, {load.busy}/{load.workers} workers busy"
    )


def _unsupported(runner: str) -> Decision:
    # The same answer a gateway gave before placement existed.
    return Decision(
        Action.DENY, f"runner {runner!r} is not enabled on this gateway", code=ErrorCode.UNSUPPORTED
    )


# --- egress -----------------------------------------------------------------------------------


def connection_refusal(*, tier: Tier, policy: PlacementPolicy, will: bytes | None) -> str | None:
    """Why this gateway must not open a connection to an upstream, or None."""
    if tier == "cloud":
        return "a cloud-tier gateway forwards nothing upstream"
    if policy.upstream_max_in_flight <= 0:
        return "placement.upstream_max_in_flight is 0: public work stays here"
    if will is not None:
        # A Last Will is a message the broker would publish for us, past every check.
        return "the upstream connection carries no Last Will"
    return None


def egress_refusal(  # noqa: PLR0911 - one return per refusal
    topic: str,
    payload: bytes,
    *,
    upstream_id: str,
    client_id: str,
    blobs: Container[str],
) -> str | None:
    """Why this message must not be published to the upstream, or None if it may.

    Reads the exact bytes about to leave, not the object they were made from. Allowed: a
    forwardable job labelled ``public``, or a chunk of a blob that ``blobs`` lists (the blobs
    named by public jobs in flight upstream), on this gateway's request topic at the upstream.
    Everything else is refused: any other topic, any other message, anything private.
    """
    try:
        expected = request_topic(upstream_id, client_id)
    except ValueError:
        return "the upstream gateway is not known yet"
    if topic != expected:
        return f"topic {topic!r} is not this gateway's request topic at the upstream"
    try:
        message = decode_request(payload)
    except ProtocolError as exc:
        return f"not a protocol v1 request ({exc.code})"
    if isinstance(message, BlobChunk):
        if message.sha256 in blobs:
            return None
        return f"blob {message.sha256[:12]} is named by no public job in flight upstream"
    if not forwardable(message):
        return f"a {type(message).__name__} is never forwarded"
    data_class = getattr(message, "data_class", "private")
    if data_class != "public":
        return f"a {data_class} job never leaves this gateway"
    return None


# --- the running gateway's side ----------------------------------------------------------------


class Placer:
    """Decides for the dispatcher, with the gateway's current load and upstream, and audits."""

    def __init__(
        self,
        *,
        tier: Tier,
        policy: PlacementPolicy,
        runners: Container[str],
        load: Callable[[], Load],
        store: Store,
        upstream: Callable[[], UpstreamState] | None = None,
    ) -> None:
        self.tier: Tier = tier
        self._policy = policy
        self._runners = runners
        self._load = load
        self._store = store
        self._upstream = upstream

    def place(self, job: PlacedJob) -> Decision:
        runner = runner_for(job)
        return decide(
            data_class=job.data_class,
            tier=self.tier,
            runner=runner,
            runner_here=runner in self._runners,
            can_forward=forwardable(job),
            load=self._load(),
            upstream=self._upstream() if self._upstream is not None else UpstreamState(),
            policy=self._policy,
        )

    def task_refusal(self) -> Decision | None:
        """Tasks carry no data label, so they count as private: not on a cloud tier."""
        if self.tier == "cloud":
            return Decision(
                Action.DENY,
                "persistent tasks are private; not on a cloud tier",
                code=ErrorCode.POLICY_DENIED,
            )
        return None

    def audit(self, client_id: str, label: str, what: str, decision: Decision) -> None:
        """One row per decision acted on: device, label, where, and why (``what``: "job ID"
        or "task NAME", then the reason)."""
        verdict = "refused" if decision.action is Action.DENY else "allowed"
        self._store.audit(
            client_id, f"place:{label}", decision.where, verdict, f"{what}: {decision.reason}"
        )
