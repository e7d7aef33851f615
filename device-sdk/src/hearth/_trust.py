"""Whom this device may talk to, and how, before a byte of MQTT leaves it.

Two rules (docs/security.md, "What the device checks"):

- **Never plaintext to a TLS listener.** A gateway whose mDNS record says ``tls=1``, or a named
  address that answers a TLS ClientHello (``hearth._tls_probe``), is reached with the
  credentials of a pairing or not at all: unpaired, the device says "pair first" with the
  command to run, and has sent it nothing but that ClientHello.
- **The gateway is the one it paired with.** When the TLS handshake fails its certificate
  check, the device reads the CA the gateway now presents and compares it with the fingerprint
  it pinned at pairing: a different CA is explained (old and new fingerprint, how to pair
  again) rather than left as ``CERTIFICATE_VERIFY_FAILED``.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass

from hearth._identity import Pairing, find_pairing, identity_for
from hearth._tls_probe import probe
from hearth.errors import GatewayIdentityChanged, GatewayUnavailable, NotPaired
from hearth.transport import BrokerAddress, TlsFiles

__all__ = ["Target", "changed_identity", "pair_command", "secure_identity"]

DEFAULT_PAIRING_PORT = 8884  # hearth-gateway's default --pairing-listen port


@dataclass(frozen=True)
class Target:
    """A gateway to connect to, with what its mDNS record said about it."""

    address: BrokerAddress
    gateway_id: str | None = None
    tls: bool | None = None  # None: not advertised (a named HOST:PORT)
    pairing_port: int | None = None
    ca_fingerprint: str = ""  # advertised (mDNS TXT ``ca``)

    @property
    def name(self) -> str:
        return (
            f"gateway {self.gateway_id} at {self.address}"
            if self.gateway_id
            else (f"the gateway at {self.address}")
        )


def pair_command(
    host: str, pairing_port: int | None, fingerprint: str, device_id: str | None = None
) -> str:
    """The command that pairs this device, CODE being what ``hearth-gateway pair`` printed."""
    where = str(BrokerAddress(host, pairing_port or DEFAULT_PAIRING_PORT))
    command = f"hearth pair CODE --gateway {where}"
    if fingerprint:
        command += f" --ca-fingerprint {fingerprint}"
    if device_id:
        command += f" --id {device_id}"
    return command + " (CODE: run `hearth-gateway pair` on the gateway)"


def secure_identity(
    target: Target, client_id: str, timeout_s: float
) -> tuple[TlsFiles | None, str]:
    """How to connect to ``target``: (TLS files, or None for plain MQTT; the device id). Raises
    NotPaired rather than let an unpaired device speak MQTT to a TLS listener."""
    tls, client_id = identity_for(target.address, target.gateway_id, client_id)
    if tls is not None or target.tls is False:
        return tls, client_id
    fingerprint = target.ca_fingerprint
    if target.tls is None:
        # Named, not discovered: only its answer to a ClientHello tells a TLS listener apart.
        try:
            presented = probe(target.address, min(timeout_s, 3.0))
        except OSError:
            return None, client_id  # nothing listens: connecting says so in its own words
        if not presented.tls:
            return None, client_id
        fingerprint = presented.ca_fingerprint
    raise NotPaired(
        f"{target.name} serves paired devices only (TLS) and this device is not paired with it",
        pair_command(target.address.host, target.pairing_port, fingerprint, client_id),
    )


def changed_identity(
    target: Target, exc: GatewayUnavailable, timeout_s: float
) -> GatewayIdentityChanged | None:
    """When connecting to a paired gateway failed its certificate check: the explanation if the
    gateway now presents another CA than the one pinned at pairing, else None."""
    if not isinstance(exc.__cause__, ssl.SSLCertVerificationError):
        return None
    paired = find_pairing(target.gateway_id, target.address)
    if paired is None:
        return None
    new = target.ca_fingerprint
    with contextlib.suppress(OSError):  # nothing listens: the advertised one, if any
        new = probe(target.address, min(timeout_s, 3.0)).ca_fingerprint or new
    if new == paired.ca_fingerprint:
        return None  # the same CA: the failure is another one (a name the certificate lacks)
    return _changed(target, paired, new)


def _changed(target: Target, paired: Pairing, new: str) -> GatewayIdentityChanged:
    presents = f"presents a CA with fingerprint {new}" if new else "presents another CA"
    message = (
        f"{target.name} {presents}, not the one this device pinned when it paired "
        f"({paired.ca_fingerprint}): the gateway's identity changed (its state directory was "
        "lost or replaced) or another machine answers there. Nothing was sent. If the gateway "
        "was reinstalled, compare the fingerprint with what `hearth-gateway pair` prints there"
    )
    host = target.address.host
    port = target.pairing_port or paired.pairing_port or None
    command = pair_command(host, port, new, paired.device_id)
    return GatewayIdentityChanged(message, command, old=paired.ca_fingerprint, new=new)
