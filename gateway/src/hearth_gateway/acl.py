"""What the managed broker enforces: its password file, and the ACL file of each listener
(docs/security.md). Pure text generation; broker.py writes the files and reloads Mosquitto.

Device ids and the gateway id are validated topic levels ([A-Za-z0-9_.-]{1,64}) before they get
here, so they cannot smuggle wildcards, separators or new lines into an ACL line.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hearth.transport import BrokerAddress

__all__ = [
    "GATEWAY_USER",
    "BrokerSecurity",
    "lan_acl",
    "local_acl",
    "pairing_acl",
    "password_line",
]

GATEWAY_USER = "hearth-gateway"  # the daemon's account on the loopback listener
_PBKDF2_ITERATIONS = 101  # mosquitto_passwd's own default for $7$


@dataclass(frozen=True)
class BrokerSecurity:
    """What the managed broker enforces. The TLS files are the PKI's (pki.py); the broker gets
    copies of its own, in its own directory."""

    gateway_id: str
    password: str  # GATEWAY_USER's, generated at each start
    lan: BrokerAddress | None = None
    pairing: BrokerAddress | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None  # the server certificate, then the CA
    key_file: Path | None = None
    crl_file: Path | None = None
    devices: frozenset[str] = frozenset()  # paired, not revoked: named in the LAN ACL
    known: frozenset[str] = frozenset()  # every id ever paired: local clients may not be them
    # The owner's grants (grants.py): (device id, publish filters, subscribe filters)
    grants: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = ()

    @property
    def tls(self) -> bool:
        return self.lan is not None


def password_line(username: str, password: str, salt: bytes | None = None) -> str:
    """A mosquitto password file line in its PBKDF2-SHA512 ``$7$`` format."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"{username}:$7${_PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}\n"


def local_acl(gateway_id: str, known: Iterable[str]) -> str:
    """The loopback listener's ACL. Mosquitto tries the client's own section first (deny lines
    before allow lines), then the patterns: the patterns keep everything under hearth/ that the
    sections do not grant out of reach, and leave other topics (ordinary MQTT devices, task
    triggers) open. It warns that those patterns name neither %c nor %u; that is intended."""
    gw = gateway_id
    lines = [
        "# Written by hearth-gateway; edits are lost.",
        "# Local processes (anonymous): never a paired device's topics.",
    ]
    for device_id in sorted(known):
        lines += [f"topic deny hearth/v1/gw/{gw}/req/{device_id}",
                  f"topic deny hearth/v1/dev/{device_id}/#"]  # fmt: skip
    lines += [
        f"topic write hearth/v1/gw/{gw}/req/+",
        "topic read hearth/v1/dev/#",
        f"topic read hearth/v1/gw/{gw}/status",
        "# The gateway daemon.",
        f"user {GATEWAY_USER}",
        f"topic read hearth/v1/gw/{gw}/req/+",
        f"topic readwrite hearth/v1/gw/{gw}/status",
        "topic write hearth/v1/dev/#",
        "topic read hearth/v1/pair/req/+",
        "topic write hearth/v1/pair/reply/+",
        "topic read $SYS/broker/log/N",  # connections' source addresses (broker.BrokerEvents)
        "topic read $SYS/broker/publish/messages/dropped",
        "# Everyone: nothing else under hearth/, anything outside it.",
        "pattern deny hearth/#",
        "pattern readwrite #",
        "",
    ]
    return "\n".join(lines)


def lan_acl(
    gateway_id: str,
    devices: Iterable[str],
    grants: Iterable[tuple[str, tuple[str, ...], tuple[str, ...]]] = (),
) -> str:
    """The device listener's ACL: one section per paired device (username = certificate CN).
    A revoked device has no section, so it may do nothing, even on a connection still open.
    ``grants``: the owner's extra topic trees per device (grants.py; validated filters)."""
    gw = gateway_id
    extra = {device_id: (publish, subscribe) for device_id, publish, subscribe in grants}
    lines = ["# Written by hearth-gateway; edits are lost. One section per paired device."]
    for device_id in sorted(devices):
        lines += [
            f"user {device_id}",
            f"topic write hearth/v1/gw/{gw}/req/{device_id}",
            f"topic read hearth/v1/dev/{device_id}/#",
            f"topic read hearth/v1/gw/{gw}/status",
        ]
        publish, subscribe = extra.get(device_id, ((), ()))
        lines += [f"topic write {f}" for f in publish]  # granted: hearth-gateway devices grant
        lines += [f"topic read {f}" for f in subscribe]
    return "\n".join([*lines, ""])


def pairing_acl() -> str:
    return "\n".join(
        [
            "# Written by hearth-gateway; edits are lost. A connection may only use the pairing",
            "# topics named by its own client id.",
            "pattern write hearth/v1/pair/req/%c",
            "pattern read hearth/v1/pair/reply/%c",
            "",
        ]
    )
