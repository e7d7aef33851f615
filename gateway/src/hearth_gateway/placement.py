"""Where work may run: the one place that decides, from the data labels of a job (and of the
blob it names) or of a task and the ``[placement]`` policy, and the one check that every message
bound for an upstream passes.

The rules::

    private  this gateway only: run now, or wait in its queue. Never forwarded, whatever the
             load; a job this gateway cannot run fails with ``policy_denied`` when an upstream
             is configured (it could have gone there, were it public), else ``unsupported``.
             A cloud-tier gateway refuses every private job with ``policy_denied``: a second
             line of defence behind the home gateway and the device SDK.
    public   this gateway, or the upstream gateway when this one is saturated (every worker
             busy and more than ``upstream_when_queue_over`` jobs waiting) or lacks the job's
             runner, and the upstream is connected and under ``upstream_max_in_flight``; but
             a public job naming a private blob (module or model) is never forwarded: the
             upstream would need the blob, so it runs here, like private work.

Persistent tasks run where they are installed, never forwarded; a cloud tier installs only
public ones.

Peer gateways on the LAN (peers.py, docs/peers.md) come after these rules: when this gateway is
saturated, or lacks the job's runner, a forwardable job (private included: a peer is paired and
on the LAN) may go to a paired peer instead of queueing here or going upstream; ``Placer``
asks ``peers`` for that. A job that came from a peer is never forwarded again.

A migratable run a saturated gateway sends away (``decide_run_move``) follows the same rules:
a public one goes to the upstream when it is ready (through its device, which resumes it
there), a private one goes back to its device, never upstream, and that refusal is audited;
with paired LAN peers, one that may take it comes first, private runs included (``run_peers``).

``decide`` and ``egress_refusal`` are pure; ``Placer`` gathers their inputs from the running
gateway and writes every decision and refusal to the audit table.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Literal

from hearth.errors import ErrorCode, ProtocolError
from hearth.protocol import (
    BlobChunk,
    CallJob,
    DataClass,
    OnnxJob,
    PipelineJob,
    RunResume,
    RunStart,
    TaskInstall,
    WasmJob,
    decode_request,
    parse_request_topic,
    request_topic,
)
from hearth_gateway.peer_ids import is_peer_id
from hearth_gateway.policy import PlacementPolicy
from hearth_gateway.runners import runner_for
from hearth_gateway.store import AuditEntry, Store

__all__ = [
    "Action",
    "Decision",
    "Load",
    "PlacedJob",
    "Placer",
    "Tier",
    "UpstreamState",
    "blob_of",
    "connection_refusal",
    "decide",
    "decide_run_move",
    "decide_task",
    "egress_refusal",
    "forwardable",
]

Tier = Literal["home", "cloud"]
PlacedJob = WasmJob | OnnxJob | CallJob | PipelineJob | RunStart | RunResume


class Action(enum.StrEnum):
    HERE = "here"  # on this gateway, a worker is free
    QUEUE = "queue"  # on this gateway, after the jobs ahead of it
    UPSTREAM = "upstream"  # forwarded to the upstream gateway
    PEER = "peer"  # forwarded to a paired gateway on the LAN (peers.py); target: its id
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
        if self.action is Action.PEER:
            return f"peer {self.target}"
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


def blob_of(job: object) -> str | None:
    """The blob (module or model) a job names, if any."""
    if isinstance(job, WasmJob | RunStart | RunResume):
        return job.module
    if isinstance(job, OnnxJob | PipelineJob):
        return job.model
    return None


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
    blob_class: DataClass | None = None,
) -> Decision:
    """Where one job runs. ``can_forward``: the job is ``forwardable``. ``blob_class``: the
    label of the stored blob the job names; None when it names none, or when the blob is not
    stored yet (the job is then answered ``need_blob`` before any decision is acted on, and
    decided again once the blob is here)."""
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
    # Forwarding would send the blob too: a private one keeps the job here. Said in the reason
    # only where an upstream could otherwise have taken the job.
    blob_private = (
        blob_class == "private" and can_forward and tier == "home" and bool(upstream.target)
    )
    may_forward = (
        can_forward
        and blob_class != "private"
        and tier == "home"
        and upstream.ready
        and policy.upstream_max_in_flight > 0
    )
    if not runner_here:
        if may_forward:
            return Decision(
                Action.UPSTREAM,
                f"public, and this gateway has no {runner!r} runner",
                upstream.target,
            )
        if blob_private:
            return Decision(
                Action.DENY,
                f"public, but its blob is private, and this gateway has no {runner!r} runner; "
                "a private blob is never forwarded upstream",
                code=ErrorCode.POLICY_DENIED,
            )
        return _unsupported(runner)
    if blob_private:
        return _here(load, "public, but its blob is private: stays on this gateway")
    if load.saturated(policy.upstream_when_queue_over):
        busy = f"{load.busy}/{load.workers} workers busy, {load.waiting} jobs waiting"
        if may_forward:
            return Decision(
                Action.UPSTREAM, f"public, and this gateway is saturated ({busy})", upstream.target
            )
        if upstream.target and can_forward:
            return _here(load, "public; saturated, but the upstream is not available")
    return _here(load, "public")


def decide_run_move(*, data_class: DataClass, tier: Tier, upstream: UpstreamState) -> Decision:
    """Where a run this gateway is too busy for goes next: UPSTREAM (``target``: the
    upstream's address) for a public run when the upstream is ready; else back to its device,
    DENY (``policy_denied``, audited) when it is a private run that an upstream could have
    taken, were it public."""
    if data_class == "public" and tier == "home" and upstream.ready:
        return Decision(
            Action.UPSTREAM, "public run, this gateway saturated: to the upstream", upstream.target
        )
    if data_class != "public" and upstream.target:
        return Decision(
            Action.DENY,
            "private run, this gateway saturated: back to its device, never upstream",
            code=ErrorCode.POLICY_DENIED,
        )
    return Decision(Action.QUEUE, "this gateway saturated: back to its device")


def decide_task(*, data_class: DataClass, tier: Tier) -> Decision:
    """Where a persistent task may be installed: on the gateway it was sent to, never forwarded
    (its state lives there); a cloud tier takes only public ones, since a task's config, state
    and the messages it handles carry its label."""
    if data_class != "public" and tier == "cloud":
        return Decision(
            Action.DENY,
            "private tasks never run on a cloud-tier gateway",
            code=ErrorCode.POLICY_DENIED,
        )
    return Decision(Action.HERE, f"{data_class}: a task runs where it is installed")


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
    blobs: Mapping[str, DataClass],
    members: Container[str] = (),
) -> str | None:
    """Why this message must not be published to the upstream, or None if it may.

    Reads the exact bytes about to leave, not the object they were made from. Allowed: a
    forwardable job labelled ``public``, or a chunk labelled ``public`` of a blob that ``blobs``
    lists as public, on this gateway's request topic at the upstream (or at one of ``members``,
    the gateways of the upstream's pool that took a job or asked for a blob: docs/protocol.md
    §19). ``blobs``: the blobs named
    by public jobs in flight upstream, each with the label this gateway recorded for it (so a
    chunk of a private blob is refused whatever label the chunk itself carries). Everything
    else is refused: any other topic, any other message, anything private.
    """
    try:
        expected = request_topic(upstream_id, client_id)
    except ValueError:
        return "the upstream gateway is not known yet"
    parsed = parse_request_topic(topic)
    pooled = parsed is not None and parsed[1] == client_id and parsed[0] in members
    if topic != expected and not pooled:
        return f"topic {topic!r} is not this gateway's request topic at the upstream"
    try:
        message = decode_request(payload)
    except ProtocolError as exc:
        return f"not a protocol v1 request ({exc.code})"
    if isinstance(message, BlobChunk):
        sha = message.sha256
        if sha not in blobs:
            return f"blob {sha[:12]} is named by no public job in flight upstream"
        if blobs[sha] != "public" or message.data_class != "public":
            return f"blob {sha[:12]} is private; it never leaves this gateway"
        return None
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
        blob_class: Callable[[str], DataClass | None],
        upstream: Callable[[], UpstreamState] | None = None,
        # peers.Peers.consider: a LAN peer's decision instead of ``decide``'s, or None.
        peers: Callable[[PlacedJob, Decision, Load, bool], Decision | None] | None = None,
        # peers.Peers.consider_run: a LAN peer for a run a saturated gateway stops, or None.
        run_peers: Callable[[PlacedJob], Decision | None] | None = None,
    ) -> None:
        self._peers = peers
        self._run_peers = run_peers
        self.tier: Tier = tier
        self._policy = policy
        self._runners = runners
        self._load = load
        self._store = store
        self._blob_class = blob_class  # BlobStore.data_class: a stored blob's label, or None
        self._upstream = upstream

    def place(self, job: PlacedJob, client_id: str = "") -> Decision:
        runner = runner_for(job)
        sha = blob_of(job)
        load = self._load()
        decision = decide(
            data_class=job.data_class,
            tier=self.tier,
            runner=runner,
            runner_here=runner in self._runners,
            can_forward=forwardable(job),
            load=load,
            upstream=self._upstream() if self._upstream is not None else UpstreamState(),
            policy=self._policy,
            blob_class=self._blob_class(sha) if sha is not None else None,
        )
        if self._peers is None or self.tier != "home" or not forwardable(job):
            return decision
        # A job a peer sent is never forwarded again (no loops between peers).
        if is_peer_id(client_id):
            return decision
        return self._peers(job, decision, load, runner in self._runners) or decision

    def place_run_move(self, job: RunStart | RunResume) -> Decision:
        upstream = self._upstream() if self._upstream is not None else UpstreamState()
        decision = decide_run_move(data_class=job.data_class, tier=self.tier, upstream=upstream)
        if self._run_peers is None or self.tier != "home":
            return decision
        return self._run_peers(job) or decision

    def place_task(self, request: TaskInstall) -> Decision:
        return decide_task(data_class=request.data_class, tier=self.tier)

    def audit(self, client_id: str, label: str, what: str, decision: Decision) -> None:
        """One row per decision acted on: device, label, where, and why (``what``: "job ID"
        or "task NAME", then the reason)."""
        self._store.audit(*self.entry(client_id, label, what, decision))

    @staticmethod
    def entry(client_id: str, label: str, what: str, decision: Decision) -> AuditEntry:
        """The audit row of a decision (for a job, written with its journal entry)."""
        verdict = "refused" if decision.action is Action.DENY else "allowed"
        return AuditEntry(
            client_id, f"place:{label}", decision.where, verdict, f"{what}: {decision.reason}"
        )
