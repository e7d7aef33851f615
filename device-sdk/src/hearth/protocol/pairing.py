"""Protocol v1, pairing: how a device gets a client certificate from a gateway with a one-time
code and nothing else (docs/protocol.md §16).

Two round trips on the gateway's pairing listener (TLS, no client certificate)::

    pair_hello                       -> pair_ca      the CA certificate; the device checks
                                                     its fingerprint, then reconnects pinned
    pair_request {csr, proof}        -> pair_result  {cert, ca, proof} or error

``proof`` = HMAC-SHA256(key, "device" 0x00 csr), key = SHA-256("hearth-pair-v1" 0x00 code):
the code itself never crosses the network. The gateway's answer carries its own proof over the
CSR, the certificate and the CA, so a device also knows it talked to the gateway that printed
the code, not to someone who answers on its address.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Annotated

import msgspec

from hearth.protocol.codec import decode_with
from hearth.protocol.messages import Error, _Message
from hearth.protocol.topics import PREFIX

__all__ = [
    "CODE_ALPHABET",
    "CODE_LENGTH",
    "PairCa",
    "PairHello",
    "PairRequest",
    "PairResult",
    "PairingReply",
    "PairingRequest",
    "decode_pairing_reply",
    "decode_pairing_request",
    "device_proof",
    "format_code",
    "gateway_proof",
    "new_code",
    "normalize_code",
    "pair_reply_topic",
    "pair_request_filter",
    "pair_request_topic",
    "pairing_key",
    "parse_pair_request_topic",
]

# Crockford's base32: no I, L, O or U, so a code read aloud or off a screen is hard to get wrong.
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 12  # 60 bits
_CODE_RE = re.compile(f"^[{CODE_ALPHABET}]{{{CODE_LENGTH}}}$")
_KEY_LABEL = b"hearth-pair-v1\x00"
# MQTT client ids of pairing connections: a topic level (the broker also refuses +, # and / in
# ids that ACL patterns substitute).
_CONNECTION_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

Proof = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
_MAX_CSR_BYTES = 4096  # an EC CSR is ~300 bytes


class PairHello(_Message, frozen=True, tag="pair_hello"):
    """Ask for the gateway's CA certificate (public; nothing secret is sent)."""


class PairCa(_Message, frozen=True, tag="pair_ca"):
    gateway_id: str
    ca: str  # PEM
    port: int  # the gateway's device listener (mutual TLS), where a paired device connects


class PairRequest(_Message, frozen=True, tag="pair_request"):
    """Sign this CSR. Its subject CN is the device id asked for."""

    csr: Annotated[bytes, msgspec.Meta(max_length=_MAX_CSR_BYTES)]  # DER
    proof: Proof  # device_proof(pairing_key(code), csr)


class PairResult(_Message, frozen=True, tag="pair_result"):
    device_id: str
    cert: str  # PEM, CN = device_id
    ca: str  # PEM
    port: int  # the device listener
    proof: Proof  # gateway_proof(pairing_key(code), csr, cert DER, CA DER)


PairingRequest = PairHello | PairRequest
PairingReply = PairCa | PairResult | Error

_request_decoder = msgspec.msgpack.Decoder(PairingRequest)
_reply_decoder = msgspec.msgpack.Decoder(PairingReply)


def decode_pairing_request(payload: bytes) -> PairingRequest:
    return decode_with(_request_decoder, payload)


def decode_pairing_reply(payload: bytes) -> PairingReply:
    return decode_with(_reply_decoder, payload)


# -- topics -------------------------------------------------------------------------------------
# No gateway id in them: the pairing listener is the gateway's own broker's (pairing needs the
# managed broker), and a device that knows only an address learns the id from pair_ca. Its ACL
# lets each connection use only the topics named by its own MQTT client id.


def pair_request_topic(connection_id: str) -> str:
    return f"{PREFIX}/pair/req/{connection_id}"


def pair_reply_topic(connection_id: str) -> str:
    return f"{PREFIX}/pair/reply/{connection_id}"


def pair_request_filter() -> str:
    return f"{PREFIX}/pair/req/+"


def parse_pair_request_topic(topic: str) -> str | None:
    """The connection id of a pairing request topic, or None."""
    head, _, connection_id = topic.rpartition("/")
    if head != f"{PREFIX}/pair/req" or not _CONNECTION_RE.match(connection_id):
        return None
    return connection_id


# -- codes and proofs ---------------------------------------------------------------------------


def new_code() -> str:
    """A fresh code: 12 random Crockford base32 characters (60 bits)."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def format_code(code: str) -> str:
    """``7KQ2M9XD3FHA`` -> ``7KQ2-M9XD-3FHA``: how people see and type it."""
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))


def normalize_code(text: str) -> str:
    """What a person typed, as the canonical code: case, dashes and spaces do not matter, and
    the look-alikes O, I and L read as 0, 1 and 1. Raises ValueError if it cannot be a code."""
    code = re.sub(r"[\s-]", "", text).upper().translate(str.maketrans("OIL", "011"))
    if not _CODE_RE.match(code):
        raise ValueError(
            f"a pairing code is {CODE_LENGTH} characters of {CODE_ALPHABET} (dashes optional)"
        )
    return code


def pairing_key(code: str) -> bytes:
    """The HMAC key both sides derive from the code (the gateway keeps only this)."""
    return hashlib.sha256(_KEY_LABEL + normalize_code(code).encode()).digest()


def device_proof(key: bytes, csr_der: bytes) -> bytes:
    return hmac.new(key, b"device\x00" + csr_der, hashlib.sha256).digest()


def gateway_proof(key: bytes, csr_der: bytes, cert_der: bytes, ca_der: bytes) -> bytes:
    message = b"gateway\x00" + b"".join(
        hashlib.sha256(part).digest() for part in (csr_der, cert_der, ca_der)
    )
    return hmac.new(key, message, hashlib.sha256).digest()
