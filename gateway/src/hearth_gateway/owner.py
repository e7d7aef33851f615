"""The box owner's pairing and registry messages, on the control socket only (control.py),
never on MQTT: ``hearth-gateway pair`` asks for a code, ``devices list`` and ``devices revoke``
look at and change the registry. Replies are these structs or the protocol's ``Error``."""

from __future__ import annotations

import msgspec

from hearth.protocol import Error
from hearth.protocol.codec import decode_with

__all__ = [
    "AdminReply",
    "AdminRequest",
    "CodeIssued",
    "CodeRequest",
    "DeviceGrant",
    "DeviceGrantList",
    "DeviceGrantsRequest",
    "DeviceInfo",
    "DeviceList",
    "DeviceListRequest",
    "DeviceRevoke",
    "DeviceRevoked",
    "decode_admin_reply",
    "decode_admin_request",
]


class _Admin(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    pass


class CodeRequest(_Admin, frozen=True, tag="pair_code"):
    ttl_s: float | None = None  # default: the daemon's pairing_code_ttl_s
    peer: bool = False  # a code that pairs a peer gateway (docs/peers.md), not a device


class CodeIssued(_Admin, frozen=True, tag="pair_code_issued"):
    code: str  # formatted, XXXX-XXXX-XXXX
    expires_at: float  # unix seconds
    gateway_id: str
    ca_fingerprint: str
    pairing_port: int
    # Where devices reach the pairing listener (advertised_addresses): the CLI's hint names them.
    addresses: list[str] = []
    peer: bool = False  # a peer code: for `hearth-gateway peers pair` on another gateway


class DeviceListRequest(_Admin, frozen=True, tag="devices_list"):
    pass


class DeviceInfo(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    serial: str
    fingerprint: str
    paired_at: float
    revoked_at: float | None
    reason: str


class DeviceList(_Admin, frozen=True, tag="devices"):
    devices: list[DeviceInfo]


class DeviceRevoke(_Admin, frozen=True, tag="device_revoke"):
    device_id: str


class DeviceRevoked(_Admin, frozen=True, tag="device_revoked"):
    device_id: str
    serials: list[str]


class DeviceGrant(_Admin, frozen=True, tag="device_grant"):
    """Topic trees a paired device may publish / subscribe under (grants.py). ``revoke``: take
    the named ones back (none named: all of the device's)."""

    device_id: str
    publish: list[str] = []
    subscribe: list[str] = []
    revoke: bool = False


class DeviceGrantsRequest(_Admin, frozen=True, tag="device_grants_list"):
    pass


class DeviceGrantList(_Admin, frozen=True, tag="device_grants"):
    # (device id, publish filters, subscribe filters)
    grants: list[tuple[str, list[str], list[str]]]


AdminRequest = CodeRequest | DeviceListRequest | DeviceRevoke | DeviceGrant | DeviceGrantsRequest
AdminReply = CodeIssued | DeviceList | DeviceRevoked | DeviceGrantList | Error

_admin_request_decoder = msgspec.msgpack.Decoder(AdminRequest)
_admin_reply_decoder = msgspec.msgpack.Decoder(AdminReply)


def decode_admin_request(payload: bytes) -> AdminRequest | None:
    """An owner's pairing/registry request, or None if the payload is something else."""
    try:
        request: AdminRequest = _admin_request_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return request


def decode_admin_reply(payload: bytes) -> AdminReply:
    return decode_with(_admin_reply_decoder, payload)
