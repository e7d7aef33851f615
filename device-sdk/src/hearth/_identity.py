"""Who this device is at a gateway: its id, and the credentials pairing left behind.

Where they are stored: ``$HEARTH_CONFIG_DIR`` (default ``$XDG_CONFIG_HOME/hearth``, i.e.
``~/.config/hearth``) ``/gateways/GATEWAY_ID/``: ``pairing.json``, ``ca.pem``, ``device.pem``,
``device.key``. Pairing itself (``hearth.pairing``) writes them; connecting only reads them.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from hearth.errors import GatewayUnavailable
from hearth.transport import BrokerAddress, TlsFiles

__all__ = [
    "ENV_CLIENT_ID",
    "ENV_CONFIG_DIR",
    "Pairing",
    "config_dir",
    "default_client_id",
    "find_pairing",
    "identity_for",
    "pairings",
]

ENV_CLIENT_ID = "HEARTH_CLIENT_ID"  # this device's id: owns its tasks, names its reply topics
ENV_CONFIG_DIR = "HEARTH_CONFIG_DIR"


def default_client_id() -> str:
    """A stable id for this device: it owns the device's tasks across restarts."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]) or "device"
    return f"dev-{host}"[:64]


@dataclass(frozen=True)
class Pairing:
    """This device's identity at one gateway."""

    gateway_id: str
    device_id: str
    host: str  # where the gateway's device listener was reached from here
    port: int
    ca_fingerprint: str
    directory: str
    pairing_port: int = 0  # where it was paired (0: a pairing stored before this was kept)

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(self.host, self.port)

    def tls(self) -> TlsFiles:
        d = Path(self.directory)
        return TlsFiles(str(d / "ca.pem"), str(d / "device.pem"), str(d / "device.key"))


def config_dir() -> Path:
    if os.environ.get(ENV_CONFIG_DIR):
        return Path(os.environ[ENV_CONFIG_DIR])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hearth"


def pairings(directory: Path | None = None) -> list[Pairing]:
    root = (directory or config_dir()) / "gateways"
    found = []
    for path in sorted(root.glob("*/pairing.json")):
        try:
            found.append(Pairing(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # a half-written or foreign file is no pairing
    return found


def find_pairing(
    gateway_id: str | None = None,
    address: BrokerAddress | None = None,
    directory: Path | None = None,
) -> Pairing | None:
    """This device's pairing with the gateway of that id, or else with that address."""
    known = pairings(directory)
    for p in known:
        if gateway_id is not None and p.gateway_id == gateway_id:
            return p
    for p in known:
        if address is not None and (p.host, p.port) == (address.host, address.port):
            return p
    return None


def identity_for(
    address: BrokerAddress, gateway_id: str | None, client_id: str
) -> tuple[TlsFiles | None, str]:
    """How ``hearth.Client`` connects to this gateway: (TLS files or None for plain MQTT, the
    device id to use). A paired gateway is reached as the paired id, which the device's default
    id gives way to; an id chosen explicitly must be the paired one."""
    paired = find_pairing(gateway_id, address)
    if paired is None:
        return None, client_id
    if client_id not in (paired.device_id, default_client_id()):
        raise GatewayUnavailable(
            f"this device is paired with {paired.gateway_id} as {paired.device_id!r}, "
            f"not {client_id!r}"
        )
    return paired.tls(), paired.device_id
