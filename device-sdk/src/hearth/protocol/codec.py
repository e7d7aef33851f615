"""Encoding and boundary validation. Nothing past ``decode_request``/``decode_reply`` sees a raw
dict from the network."""

from __future__ import annotations

import hashlib
from typing import TypeVar

import msgspec

from hearth.errors import ErrorCode, ProtocolError
from hearth.protocol.messages import (
    PROTOCOL_VERSION,
    GatewayStatus,
    Notification,
    Reply,
    Request,
)

__all__ = [
    "CONTENT_TYPE",
    "decode_notification",
    "decode_reply",
    "decode_request",
    "decode_status",
    "decode_with",
    "encode",
    "job_digest",
]

CONTENT_TYPE = "application/vnd.hearth.v1+msgpack"

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_status_decoder = msgspec.msgpack.Decoder(GatewayStatus)
_notification_decoder = msgspec.msgpack.Decoder(Notification)


class _Head(msgspec.Struct):
    """Just enough of any message to tell a newer schema from a broken one."""

    v: int = PROTOCOL_VERSION


_head_decoder = msgspec.msgpack.Decoder(_Head)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def job_digest(job: msgspec.Struct) -> bytes:
    """sha256 of a decoded job encoded again: the same content however a client encoded it
    (key order, defaults left out). A job id sent again with another digest is a ``conflict``
    (docs/protocol.md §8), on the gateway and in the device's own runtime alike."""
    return hashlib.sha256(_encoder.encode(job)).digest()


def decode_with(decoder: msgspec.msgpack.Decoder[T], payload: bytes | bytearray) -> T:
    """Decode and validate with ``decoder``; ProtocolError ``malformed`` or
    ``unsupported_version`` otherwise. For message families beyond requests and replies."""
    try:
        message = decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        _raise_if_other_version(payload)
        raise ProtocolError(ErrorCode.MALFORMED, str(exc)) from None
    version = getattr(message, "v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"schema version {version} not supported (this side speaks {PROTOCOL_VERSION})",
        )
    return message


def _raise_if_other_version(payload: bytes | bytearray) -> None:
    try:
        head = _head_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    if head.v != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"schema version {head.v} not supported (this side speaks {PROTOCOL_VERSION})",
        )


def decode_request(payload: bytes | bytearray) -> Request:
    return decode_with(_request_decoder, payload)


def decode_reply(payload: bytes | bytearray) -> Reply:
    return decode_with(_reply_decoder, payload)


def decode_notification(payload: bytes | bytearray) -> Notification:
    return decode_with(_notification_decoder, payload)


def decode_status(payload: bytes | bytearray) -> GatewayStatus:
    return decode_with(_status_decoder, payload)
