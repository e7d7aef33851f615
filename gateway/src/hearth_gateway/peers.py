"""Paired gateways on the LAN that take work from this one when it is saturated (docs/peers.md).

A gateway pairs with another as a *peer* (``hearth-gateway peers pair``): the same one-time-code
pairing as a device, with a peer code, leaving a client certificate marked ``pki.PEER_USAGE``
with CN ``peer.{this gateway's id}`` in ``state/peers/gateways/{peer id}/``. At start this
gateway opens one ``UpstreamLink`` (mutual TLS, pinned CA) to each peer whose credentials are
a peer certificate and whose address is on the LAN (``hearth._lan.on_lan``, the rule the SDK
applies to private offload); anything else is refused, logged and audited, and not used.

Selection (``choose_peer``, pure): a peer is eligible when its link is ready, it has the job's
runner, fewer than ``upstream_max_in_flight`` jobs of ours are in flight there, and its own
measured queue (the retained status it publishes: queue depth and workers) is not past
``upstream_when_queue_over`` either. Among those, a peer with a GPU/NPU execution provider comes
first for ONNX and vision work, then the shortest expected wait (its queue over its workers,
times the run time measured on jobs it ran for us). The reason names the peer and those
figures; it goes into the audit row and into the answer's ``timing.reason``.

The egress check of a peer link (``peer_egress_refusal``) allows jobs of any label, and chunks
of the blobs those jobs name, on this gateway's request topic at that peer: private work may
go, because it stays on the LAN, between gateways paired by their owner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from hearth._identity import Pairing, pairings
from hearth._lan import on_lan
from hearth.errors import ProtocolError
from hearth.protocol import BlobChunk, DataClass, GatewayStatus, decode_request, request_topic
from hearth_gateway.blobs import BlobStore
from hearth_gateway.loop import Loop
from hearth_gateway.peer_ids import peer_client_id
from hearth_gateway.pki import is_peer_cert
from hearth_gateway.placement import (
    Action,
    Decision,
    Load,
    PlacedJob,
    Tier,
    forwardable,
)
from hearth_gateway.policy import PlacementPolicy
from hearth_gateway.reply_to import ReplyTo
from hearth_gateway.runners import runner_for
from hearth_gateway.upstream import Forwarded, ForwardedJob, Forwarder
from hearth_gateway.upstream_link import Audit, UpstreamTarget

__all__ = [
    "PeerLink",
    "PeerSource",
    "PeerView",
    "Peers",
    "choose_peer",
    "peer_credentials_refusal",
    "peer_egress_refusal",
    "peers_dir",
    "peers_for",
]

log = logging.getLogger(__name__)

# Execution providers (full or short names, lower case) that mean a GPU or an NPU.
_ACCELERATED = frozenset(
    {"cuda", "tensorrt", "rocm", "migraphx", "coreml", "directml", "dml", "qnn", "cann", "openvino"}
)
_EWMA = 0.3  # weight of the newest run time in a peer's running average


def peers_dir(state_dir: Path) -> Path:
    """Where ``hearth-gateway peers pair`` leaves this gateway's peer credentials."""
    return state_dir / "peers"


# --- selection (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerView:
    """What this gateway knows of one peer when it places a job."""

    gateway_id: str
    ready: bool
    in_flight: int  # our jobs there, not yet answered
    runners: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    workers: int = 0
    queue_depth: int = 0  # from its retained status
    run_ms: float | None = None  # measured on jobs it ran for us

    @property
    def accelerators(self) -> list[str]:
        short = (p.lower().removesuffix("executionprovider") for p in self.providers)
        return [p for p in short if p in _ACCELERATED]

    def waiting(self) -> int:
        """Jobs waiting for a worker there: its reported queue, or ours in flight if more
        (the status lags behind what we just sent)."""
        return max(0, max(self.queue_depth, self.in_flight) - max(1, self.workers))

    def expected_ms(self) -> float:
        return (self.waiting() + 1) * (self.run_ms or 0.0) / max(1, self.workers)


def choose_peer(
    runner: str, peers: Sequence[PeerView], policy: PlacementPolicy
) -> tuple[PeerView, str] | None:
    """The peer a job for ``runner`` goes to, with why; None when no peer may take it."""
    eligible = [
        p
        for p in peers
        if p.ready
        and runner in p.runners
        and p.in_flight < policy.upstream_max_in_flight
        and p.waiting() <= policy.upstream_when_queue_over
    ]
    if not eligible:
        return None
    wants_accel = runner in ("onnx", "vision")
    best = min(
        eligible,
        key=lambda p: (
            not (wants_accel and p.accelerators),
            p.expected_ms(),
            p.in_flight,
            p.gateway_id,
        ),
    )
    run = f"~{best.run_ms:.0f} ms a run" if best.run_ms is not None else "run time not yet measured"
    accel = ", ".join(best.accelerators) or "CPU"
    why = f"queue {best.queue_depth}, {best.workers} workers, {run}, {accel}"
    if wants_accel and best.accelerators:
        why += f"; {runner} work prefers an accelerator"
    return best, why


# --- the egress check of a peer link -------------------------------------------------------------


def peer_egress_refusal(  # noqa: PLR0911 - one return per refusal
    topic: str,
    payload: bytes,
    *,
    upstream_id: str,
    client_id: str,
    blobs: Mapping[str, DataClass],
    members: Container[str] = (),  # a pool's members: unused, a peer is not a pool
) -> str | None:
    """Why this message must not be published to a paired LAN peer, or None. Allowed: a
    forwardable job of any label, or a chunk of a blob that a job in flight there names, on
    this gateway's request topic at the peer. Everything else is refused."""
    try:
        expected = request_topic(upstream_id, client_id)
    except ValueError:
        return "the peer gateway is not known yet"
    if topic != expected:
        return f"topic {topic!r} is not this gateway's request topic at the peer"
    try:
        message = decode_request(payload)
    except ProtocolError as exc:
        return f"not a protocol v1 request ({exc.code})"
    if isinstance(message, BlobChunk):
        if message.sha256 not in blobs:
            return f"blob {message.sha256[:12]} is named by no job in flight at the peer"
        return None
    if not forwardable(message):
        return f"a {type(message).__name__} is never forwarded"
    return None


def peer_credentials_refusal(pairing: Pairing, own_id: str) -> str | None:
    """Why stored peer credentials must not be used: not a peer certificate (a device's, say),
    not for this gateway's peer id, or a peer that is not on the LAN."""
    try:
        cert = x509.load_pem_x509_certificate(Path(pairing.directory, "device.pem").read_bytes())
    except (OSError, ValueError) as exc:
        return f"its certificate is unreadable: {exc}"
    if not is_peer_cert(cert):
        return "its certificate is a device certificate, not a peer one: pair with a peer code"
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    want = peer_client_id(own_id)
    if [n.value for n in names] != [want]:
        return f"its certificate is not for {want!r}"
    if not on_lan(pairing.host):
        return f"{pairing.host} is not a LAN address: private work may only go to the LAN"
    return None


# --- the running gateway's side ------------------------------------------------------------------


class PeerLink:
    """One paired peer: its forwarder (an UpstreamLink with the peer's egress check) and what
    it measured."""

    def __init__(
        self,
        pairing: Pairing,
        own_id: str,
        loop: Loop,
        *,
        policy: PlacementPolicy,
        blobs: BlobStore,
        audit: Audit,
        relay: Callable[[Forwarded, bytes], None],
        fallback: Callable[[Forwarded, str], None],
    ) -> None:
        self.gateway_id = pairing.gateway_id
        self.client_id = peer_client_id(own_id)
        self.status: GatewayStatus | None = None
        self.run_ms: float | None = None
        tls = pairing.tls()
        target = UpstreamTarget(
            pairing.address,
            tls=True,
            ca_file=tls.ca_file or "",
            cert_file=tls.cert_file or "",
            key_file=tls.key_file or "",
            gateway_id=pairing.gateway_id,
        )
        self.forwarder = Forwarder(
            loop,
            target,
            own_id,
            policy=policy,
            blobs=blobs,
            audit=audit,
            relay=relay,
            fallback=fallback,
            peer=self,
        )

    def link_options(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "egress": peer_egress_refusal,
            "on_status": self._status,
            "what": "a paired LAN peer: jobs of any label",
        }

    def _status(self, status: GatewayStatus) -> None:
        self.status = status

    def ran(self, run_ms: float) -> None:
        self.run_ms = run_ms if self.run_ms is None else (1 - _EWMA) * self.run_ms + _EWMA * run_ms

    def view(self) -> PeerView:
        status = self.status
        return PeerView(
            gateway_id=self.gateway_id,
            ready=self.forwarder.link.ready and status is not None,
            in_flight=self.forwarder.in_flight,
            runners=tuple(status.runners) if status else (),
            providers=tuple(status.providers) if status else (),
            workers=status.workers if status else 0,
            queue_depth=status.queue_depth if status else 0,
            run_ms=self.run_ms,
        )


@dataclass(frozen=True)
class PeerSource:
    """Where a gateway's peer pairings are (``state/peers/``), and what every link to one of
    them is made with."""

    directory: Path
    own_id: str
    loop: Loop
    blobs: BlobStore
    audit: Audit
    relay: Callable[[Forwarded, bytes], None]
    fallback: Callable[[Forwarded, str], None]


class Peers:
    """Every usable peer of this gateway; placement asks ``consider``, dispatch ``forward``.

    The pairings are read from ``state/peers/`` at start and again whenever that folder
    changes (``refresh``, from the daemon's housekeeping): a peer paired or revoked with
    ``hearth-gateway peers`` while the daemon runs is used, or dropped, within seconds."""

    def __init__(
        self, links: list[PeerLink], policy: PlacementPolicy, source: PeerSource | None = None
    ) -> None:
        self.links = {link.gateway_id: link for link in links}
        self._policy = policy
        self._source = source  # None: these links, never others
        self._seen: dict[str, tuple[str, int]] = {}  # peer id -> (its folder, cert mtime)
        self._started = False
        self._closed = False
        self._signature: tuple[tuple[str, int], ...] | None = None
        self.refresh()

    @staticmethod
    def _read(directory: Path) -> tuple[tuple[str, int], ...]:
        """The files of the folder's pairings with their mtimes: cheap, for noticing a change
        (a pairing being written shows up again once its last file is there)."""
        found = []
        for path in sorted(directory.glob("gateways/*/*")):
            try:
                found.append((str(path), path.stat().st_mtime_ns))
            except OSError:
                continue  # being written or removed: the next look sees it
        return tuple(found)

    def refresh(self) -> bool:
        """Follow ``state/peers/``: open links to peers paired since the last look, close the
        links of peers whose credentials are gone or replaced (their jobs in flight run here).
        Returns whether anything changed."""
        source = self._source
        if self._closed or source is None:
            return False
        signature = self._read(source.directory)
        if signature == self._signature:
            return False
        self._signature = signature
        mtimes = dict(signature)
        current: dict[str, Pairing] = {}
        for pairing in pairings(source.directory):
            why = peer_credentials_refusal(pairing, source.own_id)
            cert = str(Path(pairing.directory, "device.pem"))
            key = (str(pairing.directory), mtimes.get(cert, 0))
            if why is not None:
                if self._seen.get(pairing.gateway_id) != key:
                    source.audit(source.own_id, "peer:connect", pairing.gateway_id, "refused", why)
                    log.error("not using peer %s: %s", pairing.gateway_id, why)
                    self._seen[pairing.gateway_id] = key
                continue
            current[pairing.gateway_id] = pairing
            if pairing.gateway_id in self.links and self._seen.get(pairing.gateway_id) == key:
                continue
            self._drop(pairing.gateway_id, "paired again: new credentials")
            self._seen[pairing.gateway_id] = key
            link = PeerLink(
                pairing,
                source.own_id,
                source.loop,
                policy=self._policy,
                blobs=source.blobs,
                audit=source.audit,
                relay=source.relay,
                fallback=source.fallback,
            )
            self.links[pairing.gateway_id] = link
            if self._started:
                log.info("peer %s paired: forwarding to it when saturated", pairing.gateway_id)
                link.forwarder.start()
        for gone in [g for g in self.links if g not in current]:
            self._drop(gone, "its pairing was removed (hearth-gateway peers revoke)")
            self._seen.pop(gone, None)
        return True

    def _drop(self, peer_id: str, why: str) -> None:
        link = self.links.pop(peer_id, None)
        if link is not None:
            log.info("peer %s no longer used: %s", peer_id, why)
            link.forwarder.withdraw(f"peer {peer_id} {why}")

    def start(self) -> None:
        self._started = True
        for link in self.links.values():
            link.forwarder.start()

    def views(self) -> list[PeerView]:
        return [link.view() for link in self.links.values()]

    def consider(
        self, job: PlacedJob, decision: Decision, load: Load, runner_here: bool
    ) -> Decision | None:
        """A peer's decision instead of ``decision`` (placement.decide's), or None to keep it:
        only when this gateway is saturated, or cannot run the job at all."""
        if decision.action is Action.HERE or not self.links:
            return None
        saturated = load.saturated(self._policy.upstream_when_queue_over)
        if decision.action is Action.DENY and runner_here:
            return None
        if runner_here and not saturated:
            return None
        runner = runner_for(job)
        chosen = choose_peer(runner, self.views(), self._policy)
        if chosen is None:
            return None
        peer, why = chosen
        if runner_here:
            busy = f"{load.busy}/{load.workers} workers busy, {load.waiting} jobs waiting"
            here = f"this gateway is saturated ({busy})"
        else:
            here = f"this gateway has no {runner!r} runner"
        return Decision(
            Action.PEER,
            f"{job.data_class}, {here}: to paired LAN peer {peer.gateway_id} ({why})",
            peer.gateway_id,
        )

    def consider_run(self, job: PlacedJob) -> Decision | None:
        """Where a migratable run this saturated gateway stops goes instead of ``decide_run_move``'s
        answer: a paired LAN peer that may take it (private runs too: the snapshot stays on the
        LAN), named by the address of its device listener, which the run's device resumes it at
        (it must be paired with that peer too; docs/peers.md). None: no peer may."""
        chosen = choose_peer(runner_for(job), self.views(), self._policy)
        if chosen is None:
            return None
        peer, why = chosen
        address = self.links[peer.gateway_id].forwarder.link.target.address
        return Decision(
            Action.PEER,
            f"to paired LAN peer {peer.gateway_id} at {address} ({why})",
            str(address),
        )

    def forward(self, job: ForwardedJob, reply_to: ReplyTo, decision: Decision) -> None:
        link = self.links.get(decision.target)
        if link is None and self._source is not None:  # revoked since the decision: run here
            item = Forwarded(job, reply_to, token=b"")
            self._source.fallback(item, f"peer {decision.target} is no longer paired")
            return
        assert link is not None, decision
        link.forwarder.forward(job, reply_to, decision.reason)

    @property
    def idle(self) -> bool:
        return all(link.forwarder.idle for link in self.links.values())

    @property
    def forwarded(self) -> int:
        return sum(link.forwarder.forwarded for link in self.links.values())

    def close(self) -> None:
        """Disconnect from every peer. Idempotent."""
        self._closed = True
        for link in self.links.values():
            link.forwarder.close()


def peers_for(
    state_dir: Path,
    own_id: str,
    tier: Tier,
    loop: Loop,
    *,
    policy: PlacementPolicy,
    blobs: BlobStore,
    audit: Audit,
    relay: Callable[[Forwarded, bytes], None],
    fallback: Callable[[Forwarded, str], None],
) -> Peers | None:
    """The peers paired from ``state_dir`` (and any paired later, ``Peers.refresh``); None on
    a cloud tier, which forwards nothing."""
    if tier != "home":
        return None
    source = PeerSource(peers_dir(state_dir), own_id, loop, blobs, audit, relay, fallback)
    return Peers([], policy, source)
