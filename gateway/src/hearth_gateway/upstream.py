"""Public jobs forwarded to the upstream gateway, and their answers relayed to the device.

The dispatcher hands over a job that placement sent upstream, already journaled here (so if
this gateway restarts first, the job runs here). Upstream, every device of this gateway is one
``{client}``, ``gw-{gateway id}``, so a job travels under an id derived from the device's id and
its own job id; the answer comes back to the device with its own job id, on its own Response
Topic and correlation, and with ``timing.upstream`` naming the gateway that ran it. When the
upstream asks for the module or model (``need_blob``), this gateway uploads it from its blob
store if it is labelled public (placement keeps a public job naming a private blob here; this
checks again).

The upstream may be a pool of cloud-tier gateways (docs/protocol.md §19): a job goes to the
pool's id, the member that takes it answers ``accepted`` (or a ``need_blob`` naming itself),
and from then on the blob and any re-send go to that member. A member's Last Will sends its
unanswered jobs, and those no member has taken yet, to the pool again. Whatever goes wrong
upstream (no answer in time, a lost connection,
``overloaded`` or another refusal) the job falls back to this gateway: it is public, it may
run here.

Everything here runs on the daemon's loop thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from hearth.errors import ErrorCode, ProtocolError
from hearth.protocol import (
    Accepted,
    BlobChunk,
    BlobStored,
    CallJob,
    CallResult,
    DataClass,
    Error,
    NeedBlob,
    OnnxJob,
    OnnxResult,
    PipelineJob,
    PipelineReply,
    Reply,
    WasmJob,
    WasmResult,
    decode_reply,
    encode,
    request_topic,
)
from hearth_gateway.blobs import BlobStore
from hearth_gateway.config import Config
from hearth_gateway.loop import Loop, Timer
from hearth_gateway.placement import UpstreamState, blob_of
from hearth_gateway.policy import PlacementPolicy
from hearth_gateway.reply_to import ReplyTo
from hearth_gateway.upstream_link import (
    Audit,
    EgressRefused,
    UpstreamLink,
    UpstreamTarget,
    UpstreamUnavailable,
)

__all__ = ["Forwarded", "Forwarder", "PeerLinkOptions", "forwarder_for"]

log = logging.getLogger(__name__)

ForwardedJob = WasmJob | OnnxJob | CallJob | PipelineJob
_RESULT: dict[type, type] = {
    WasmJob: WasmResult,
    OnnxJob: OnnxResult,
    CallJob: CallResult,
    PipelineJob: PipelineReply,
}
# Errors that are the job's own doing: the upstream's answer is the job's answer. Any other
# error (overloaded, shutting_down, unsupported, a version or size mismatch...) says something
# about the upstream, so the job runs here instead.
_RELAYED_ERRORS = frozenset(
    {
        ErrorCode.INVALID_MODULE,
        ErrorCode.INVALID_MODEL,
        ErrorCode.BAD_TENSOR,
        ErrorCode.BAD_IMAGE,
        ErrorCode.BAD_PARAMS,
        ErrorCode.TRAP,
        ErrorCode.TIMEOUT,
        ErrorCode.MEMORY_LIMIT,
        ErrorCode.OUTPUT_LIMIT,
    }
)
_MAX_CHUNK = 1 << 20  # bytes per uploaded chunk: small enough not to hog the uplink per packet
_JOB = b"job:"
_BLOB = b"blob:"


class PeerLinkOptions(Protocol):
    """What makes a Forwarder one to a LAN peer (peers.PeerLink implements it)."""

    def link_options(self) -> dict[str, Any]: ...  # UpstreamLink's peer keyword arguments

    def ran(self, run_ms: float) -> None: ...  # a run time the peer measured


def upstream_job_id(client_id: str, job_id: str) -> str:
    """The job's id upstream: stable (a retry is answered from the upstream's journal) and
    distinct per device (two devices' "job-1" are two jobs)."""
    return "h" + hashlib.sha256(f"{client_id}\0{job_id}".encode()).hexdigest()[:40]


@dataclass(slots=True)
class Forwarded:
    job: ForwardedJob
    reply_to: ReplyTo  # the device's request: where the upstream's answer is relayed
    token: bytes  # our Correlation Data upstream
    timer: Timer | None = None
    uploads: int = 0
    member: str = ""  # the pool member that took it (accepted / need_blob); "": the pool
    reason: str = ""  # placement's, when it went to a LAN peer: named in the answer's timing


class Forwarder:
    def __init__(
        self,
        loop: Loop,
        target: UpstreamTarget,
        gateway_id: str,
        *,
        policy: PlacementPolicy,
        blobs: BlobStore,
        audit: Audit,
        relay: Callable[[Forwarded, bytes], None],
        fallback: Callable[[Forwarded, str], None],
        peer: PeerLinkOptions | None = None,
    ) -> None:
        self._loop = loop
        # A LAN peer (peers.py) takes private jobs and blobs too: its egress check allows them.
        self._peer = peer
        self._where = "upstream" if peer is None else f"peer {target.gateway_id}"
        self._policy = policy
        self._blobs = blobs
        self._relay = relay
        self._fallback = fallback
        self._pending: dict[bytes, Forwarded] = {}
        # sha256 (at the upstream) or "member:sha256" (at a pool member) -> tokens of the jobs
        # waiting on its upload there
        self._uploads: dict[str, list[bytes]] = {}
        self.forwarded = 0
        self.resubmitted = 0  # jobs sent to the pool again after a member's Last Will
        self.answered = 0
        self.fell_back = 0
        self.link = UpstreamLink(
            loop,
            target,
            gateway_id,
            policy=policy,
            audit=audit,
            cleared_blobs=self._cleared_blobs,
            on_reply=self._reply,
            on_refused=self._refused,
            on_lost=self._lost,
            on_member_lost=self._member_lost,
            **({} if peer is None else peer.link_options()),
        )

    def start(self) -> None:
        self.link.start()

    def state(self) -> UpstreamState:
        ready = self.link.ready and len(self._pending) < self._policy.upstream_max_in_flight
        return UpstreamState(target=str(self.link.target.address), ready=ready)

    @property
    def idle(self) -> bool:
        return not self._pending

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _cleared_blobs(self) -> dict[str, DataClass]:
        """The blobs public jobs in flight upstream name, the only ones that may be uploaded,
        each with its label here: the egress check lets only the public ones out."""
        return {
            sha: self._blobs.data_class(sha) or "private"
            for item in self._pending.values()
            if (sha := blob_of(item.job))
        }

    # -- jobs -----------------------------------------------------------------------------------

    def forward(self, job: ForwardedJob, reply_to: ReplyTo, reason: str = "") -> None:
        item = Forwarded(job, reply_to, token=_JOB + os.urandom(16), reason=reason)
        on_lan = self._peer is not None
        if job.data_class != "public" and not on_lan:  # placement never sends one upstream
            self._fallback(item, "a private job is never forwarded")
            return
        sha = blob_of(job)
        if sha is not None and not on_lan and self._blobs.data_class(sha) == "private":
            self._fallback(item, f"blob {sha[:12]} is private; a job naming it is not forwarded")
            return
        self._pending[item.token] = item
        item.timer = self._loop.call_later(
            self._policy.upstream_timeout_s,
            lambda: self._give_up(
                item.token, f"no answer within {self._policy.upstream_timeout_s:.0f} s"
            ),
        )
        self.forwarded += 1
        self._send(item)

    def _send(self, item: Forwarded) -> None:
        job = msgspec.structs.replace(
            item.job, job_id=upstream_job_id(item.reply_to.client_id, item.job.job_id)
        )
        try:
            self.link.send(job, item.token, to=item.member)
        except (EgressRefused, UpstreamUnavailable) as exc:
            self._give_up(item.token, str(exc))

    def _give_up(self, token: bytes, why: str) -> None:
        item = self._pending.pop(token, None)
        if item is None:
            return
        if item.timer is not None:
            item.timer.cancel()
        self.fell_back += 1
        log.info(
            "job %s of %s runs here instead of on %s: %s",
            item.job.job_id,
            item.reply_to.client_id,
            self._where,
            why,
        )
        self._fallback(item, f"{self._where}: {why}")

    def _lost(self) -> None:
        self._uploads.clear()
        for token in list(self._pending):
            self._give_up(token, "lost the upstream")

    def _member_lost(self, member: str) -> None:
        """A pool member's Last Will: what it took, and what no member has taken yet (it may
        have been on its way to that member), goes to the pool again. A job run twice this way
        is answered once here: the first answer wins (docs/protocol.md §19)."""
        for key in [k for k in self._uploads if k.startswith(f"{member}:")]:
            del self._uploads[key]
        again = [t for t, item in self._pending.items() if item.member in ("", member)]
        if again:
            log.warning("pool member %s is gone: %d jobs go to the pool again", member, len(again))
        for token in again:
            item = self._pending[token]
            item.member, item.uploads = "", 0
            self.resubmitted += 1
            self._send(item)

    def _refused(self, correlation: bytes, why: str) -> None:
        if correlation.startswith(_BLOB):
            self._upload_done(correlation[len(_BLOB) :].decode(errors="replace"), None, why)
        else:
            self._give_up(correlation, why)

    # -- answers --------------------------------------------------------------------------------

    def _reply(self, correlation: bytes, payload: bytes) -> None:
        try:
            reply: Reply | None = decode_reply(payload)
            why = ""
        except ProtocolError as exc:
            reply, why = None, f"a malformed answer ({exc.code})"
        if correlation.startswith(_BLOB):
            self._upload_done(correlation[len(_BLOB) :].decode(errors="replace"), reply, why)
            return
        item = self._pending.get(correlation)
        if item is None:
            return  # late: the job already fell back
        if reply is None:
            self._give_up(correlation, why)
        elif isinstance(reply, Accepted):
            self._taken(item, reply.gateway_id)
        elif isinstance(reply, NeedBlob):
            self._need_blob(item, reply)
        elif isinstance(reply, Error):
            if reply.code in _RELAYED_ERRORS:
                self._answer(item, msgspec.structs.replace(reply, job_id=item.job.job_id))
            else:
                self._give_up(correlation, f"it answered {reply.code}: {reply.message}")
        elif isinstance(reply, _RESULT[type(item.job)]):
            result: WasmResult | OnnxResult | CallResult | PipelineReply = reply  # type: ignore[assignment]
            ran = item.member or self.link.upstream_id
            timing = msgspec.structs.replace(
                result.timing, upstream=ran, reason=item.reason or msgspec.UNSET
            )
            if self._peer is not None:
                self._peer.ran(result.timing.run_ms)
            self._answer(
                item, msgspec.structs.replace(result, job_id=item.job.job_id, timing=timing)
            )
        else:
            self._give_up(correlation, f"an unexpected {type(reply).__name__}")

    def _taken(self, item: Forwarded, member: str) -> None:
        """A pool member took the job (or asked for its blob): re-sends go there."""
        try:
            request_topic(member, self.link.client_id)  # an id fit for a topic level
        except ValueError:
            self._give_up(item.token, f"it named an invalid pool member {member[:64]!r}")
            return
        item.member = member
        self.link.members.add(member)

    def _answer(self, item: Forwarded, reply: msgspec.Struct) -> None:
        del self._pending[item.token]
        if item.timer is not None:
            item.timer.cancel()
        self.answered += 1
        self._relay(item, encode(reply))

    # -- blobs ----------------------------------------------------------------------------------

    def _need_blob(self, item: Forwarded, need: NeedBlob) -> None:
        # A pool member named itself: the upload and the job again go to it.
        if isinstance(need.gateway_id, str) and need.gateway_id:
            self._taken(item, need.gateway_id)
            if item.token not in self._pending:
                return
        sha = blob_of(item.job)
        if need.sha256 != sha or item.uploads >= 2:
            self._give_up(item.token, f"it asked for blob {need.sha256[:12]} again or instead")
            return
        label = self._blobs.data_class(sha) or "private"
        if label != "public" and self._peer is None:
            # Placement does not forward a job naming a private blob; this holds if the blob
            # was replaced (removed and uploaded again as private) since.
            self._give_up(item.token, f"blob {sha[:12]} is private; it is never uploaded")
            return
        item.uploads += 1
        key = f"{item.member}:{sha}" if item.member else sha
        waiting = self._uploads.get(key)
        if waiting is not None:
            waiting.append(item.token)  # one upload serves every job naming the blob
            return
        try:
            data = self._blobs.path(sha).read_bytes()
        except OSError as exc:
            self._give_up(item.token, f"blob {sha[:12]} unreadable here: {exc}")
            return
        if hashlib.sha256(data).hexdigest() != sha:
            self._give_up(item.token, f"stored blob {sha[:12]} failed its hash check")
            return
        self._uploads[key] = [item.token]
        chunk = max(1, min(need.max_chunk, _MAX_CHUNK))
        correlation = _BLOB + key.encode()
        try:
            for offset in range(0, max(len(data), 1), chunk):
                part = BlobChunk(
                    sha256=sha,
                    size=len(data),
                    offset=offset,
                    data=data[offset : offset + chunk],
                    data_class=label,
                )
                self.link.send(part, correlation, to=item.member)
        except (EgressRefused, UpstreamUnavailable) as exc:
            self._upload_done(key, None, str(exc))

    def _upload_done(self, key: str, reply: Reply | None, why: str) -> None:
        tokens = self._uploads.pop(key, [])
        sha = key.rpartition(":")[2]
        stored = isinstance(reply, BlobStored) and reply.sha256 == sha
        if not stored and not why:
            why = f"blob upload answered {reply.code if isinstance(reply, Error) else reply}"
        for token in tokens:
            item = self._pending.get(token)
            if item is None:
                continue
            if stored:
                self._send(item)
            else:
                self._give_up(token, why)

    def withdraw(self, why: str) -> None:
        """Stop forwarding while the gateway goes on (a peer revoked): the jobs in flight there
        run here now."""
        for token in list(self._pending):
            self._give_up(token, why)
        self.close()

    def close(self) -> None:
        """Stop forwarding. Jobs still in flight stay journaled and run here on the next
        start. Idempotent."""
        for item in self._pending.values():
            if item.timer is not None:
                item.timer.cancel()
        self._pending.clear()
        self._uploads.clear()
        self.link.close()


def forwarder_for(
    config: Config,
    loop: Loop,
    gateway_id: str,
    *,
    policy: PlacementPolicy,
    blobs: BlobStore,
    audit: Audit,
    relay: Callable[[Forwarded, bytes], None],
    fallback: Callable[[Forwarded, str], None],
) -> Forwarder | None:
    """The forwarder a configuration asks for: None without an upstream."""
    if not config.upstream:
        return None
    target = UpstreamTarget.parse(
        config.upstream,
        ca_file=config.upstream_ca,
        cert_file=config.upstream_cert,
        key_file=config.upstream_key,
        gateway_id=config.upstream_gateway_id,
    )
    return Forwarder(
        loop,
        target,
        gateway_id,
        policy=policy,
        blobs=blobs,
        audit=audit,
        relay=relay,
        fallback=fallback,
    )
