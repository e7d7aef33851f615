"""Who is a peer gateway: the naming rule shared by pairing, the broker's ACL and dispatch.

A peer gateway pairs like a device, with a peer code, and its certificate's CN (its broker user
and client id) is ``peer.`` + its gateway id; the CA marks that certificate with
``pki.PEER_USAGE``. No device may take a ``peer.`` id, and a peer code pairs nothing else, so
on the broker a ``peer.`` user is always a peer gateway and a device never is one.
"""

from __future__ import annotations

from hearth.protocol import (
    BlobChunk,
    CallJob,
    OnnxJob,
    Ping,
    PipelineJob,
    Request,
    WasmJob,
)

__all__ = [
    "PEER_PREFIX",
    "is_peer_id",
    "peer_client_id",
    "peer_request_refusal",
    "peer_role_refusal",
]

PEER_PREFIX = "peer."
_MAX_ID = 64


def peer_client_id(gateway_id: str) -> str:
    """The id a gateway pairs and connects with at its peers. Raises ValueError when the
    gateway id is too long to leave room for the prefix (ids are at most 64 characters)."""
    client_id = PEER_PREFIX + gateway_id
    if len(client_id) > _MAX_ID:
        raise ValueError(
            f"gateway id {gateway_id!r} is too long to pair as a peer "
            f"(at most {_MAX_ID - len(PEER_PREFIX)} characters)"
        )
    return client_id


def is_peer_id(client_id: str) -> bool:
    return client_id.startswith(PEER_PREFIX)


def peer_role_refusal(device_id: str, *, peer: bool) -> str | None:
    """Why a pairing request asking for ``device_id`` with a code of this kind is refused."""
    if peer and not is_peer_id(device_id):
        return (
            f"this is a peer code: it pairs a gateway (`hearth-gateway peers pair`, "
            f"id {PEER_PREFIX}GATEWAY_ID), not the device {device_id!r}"
        )
    if not peer and is_peer_id(device_id):
        return (
            f"ids starting {PEER_PREFIX!r} are peer gateways: a device cannot pair as "
            f"{device_id!r}; a peer pairs with a peer code (`hearth-gateway pair --peer`)"
        )
    return None


def peer_request_refusal(request: Request) -> str | None:
    """What a peer gateway may ask of this one: submit self-contained jobs (with the blobs they
    name) and receive their answers, nothing else; tasks, runs, sessions and streams belong to
    devices."""
    if isinstance(request, Ping | BlobChunk | WasmJob | OnnxJob | PipelineJob):
        return None
    if isinstance(request, CallJob) and request.stream is None and request.session is None:
        return None
    return f"a peer gateway may only submit jobs, not a {type(request).__name__}"
