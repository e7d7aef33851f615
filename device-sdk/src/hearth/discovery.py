"""Finding gateways: mDNS/DNS-SD browse for ``_hearth._tcp.local.``, then a round-trip probe
of each one so callers can pick by measured latency (R3, R4): an MQTT ping where this device
may speak MQTT (a plain listener, or a TLS one it is paired with), else a TCP connect, which
sends no byte (an unpaired device never sends its MQTT CONNECT to a TLS listener).

Each gateway found is compared with this device's pairings: ``paired``, and ``ca_changed``
when the CA it advertises is not the one pinned at pairing (``hearth discover`` warns)."""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from hearth._connection import Connection
from hearth._identity import ENV_CLIENT_ID, default_client_id, find_pairing, identity_for
from hearth._tls_probe import connect_ms
from hearth.errors import HearthError
from hearth.protocol import SERVICE_TYPE
from hearth.transport import BrokerAddress

if TYPE_CHECKING:
    from zeroconf import ServiceListener, Zeroconf

__all__ = ["GatewayInfo", "discover"]


@dataclass
class GatewayInfo:
    gateway_id: str
    broker: BrokerAddress
    protocol: int = 1
    version: str = ""
    tls: bool = False
    runners: list[str] = field(default_factory=list)
    accelerators: list[str] = field(default_factory=list)
    capabilities: dict[str, str] = field(default_factory=dict)  # name -> version
    load: float = 0.0
    rtt_ms: float | None = None  # median MQTT round trip, when measured
    ca_fingerprint: str = ""  # the gateway CA's SHA-256, hex: what pairing pins (tls only)
    pairing_port: int | None = None  # where `hearth pair` talks to it (tls only)
    pinned_ca_fingerprint: str = ""  # what this device pinned when it paired with it, if it did
    rtt_probe: str = ""  # how rtt_ms was measured: "mqtt" (a ping) or "tcp" (a connect)
    # The mDNS instance name: for people only (two boxes called raspberrypi: one of them is
    # "raspberrypi (2)", RFC 6762 §9); gateways are told apart by ``key``.
    instance: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """What identifies a gateway: its id and its CA fingerprint (a plain listener has none:
        its address then), never the instance name, which a conflict on the LAN changes."""
        return (self.gateway_id, self.ca_fingerprint or str(self.broker))

    @property
    def paired(self) -> bool:
        """This device holds a pairing with this gateway (by id)."""
        return bool(self.pinned_ca_fingerprint)

    @property
    def ca_changed(self) -> bool:
        """It advertises another CA than the one this device pinned when it paired."""
        return (
            self.paired
            and bool(self.ca_fingerprint)
            and (self.ca_fingerprint != self.pinned_ca_fingerprint)
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "gateway_id": self.gateway_id,
            "broker": str(self.broker),
            "protocol": self.protocol,
            "version": self.version,
            "tls": self.tls,
            "runners": self.runners,
            "accelerators": self.accelerators,
            "capabilities": self.capabilities,
            "load": self.load,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "ca_fingerprint": self.ca_fingerprint,
            "pairing_port": self.pairing_port,
            "paired": self.paired,
            "pinned_ca_fingerprint": self.pinned_ca_fingerprint,
            "ca_changed": self.ca_changed,
            "rtt_probe": self.rtt_probe,
            "instance": self.instance,
        }


class _Collector:
    """A zeroconf ServiceListener (duck-typed: zeroconf is imported only when discovering, so a
    command that reaches its stored gateway does not pay for importing it)."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.lock = threading.Lock()

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self.lock:
            self.names.add(name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.add_service(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self.lock:
            self.names.discard(name)


def _parse(props: dict[bytes, bytes | None], addresses: list[str], port: int) -> GatewayInfo | None:
    txt = {
        k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in props.items()
    }
    if txt.get("pv") != "1" or not txt.get("id"):
        return None  # another protocol version: not ours to talk to
    host = txt.get("host", "")
    if not host or host in ("0.0.0.0", "::"):
        if not addresses:
            return None
        host = addresses[0]
    try:
        broker_port = int(txt.get("port") or port)
    except ValueError:
        return None
    try:
        load = float(txt.get("load", "0") or 0)
    except ValueError:
        load = 0.0
    return GatewayInfo(
        gateway_id=txt["id"],
        broker=BrokerAddress(host, broker_port),
        protocol=1,
        version=txt.get("ver", ""),
        tls=txt.get("tls") == "1",
        runners=[r for r in txt.get("runners", "").split(",") if r],
        accelerators=[a for a in txt.get("acc", "").split(",") if a],
        capabilities=dict(c.partition("@")[::2] for c in txt.get("caps", "").split(",") if c),
        load=load,
        ca_fingerprint=txt.get("ca", "").lower(),
        pairing_port=int(txt["pport"]) if txt.get("pport", "").isdigit() else None,
    )


def discover(
    timeout_s: float = 1.5,
    *,
    interface: str | None = None,
    measure: bool = True,
    probes: int = 3,
    first: bool = False,
) -> list[GatewayInfo]:
    """Gateways on the LAN, fastest first when ``measure`` (unmeasured ones last).

    Listens for the whole ``timeout_s`` so slow responders are not missed, unless ``first``:
    then it returns as soon as one gateway is resolved. ``interface`` (an IP) restricts mDNS
    to one interface, e.g. "127.0.0.1" in tests.
    """
    from zeroconf import IPVersion, ServiceBrowser, Zeroconf

    zc = (
        Zeroconf(interfaces=[interface], ip_version=IPVersion.V4Only)
        if interface
        else Zeroconf(ip_version=IPVersion.V4Only)
    )
    collector = _Collector()
    found: dict[str, GatewayInfo] = {}
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, cast("ServiceListener", collector))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.05)
            with collector.lock:
                names = list(collector.names)
            if first and found:
                break
            for name in names:
                if name in found:
                    continue
                info = zc.get_service_info(SERVICE_TYPE, name, timeout=500)
                if info is None:
                    continue
                gw = _parse(dict(info.properties), info.parsed_addresses(), info.port or 1883)
                if gw is not None:
                    gw.instance = name.removesuffix(f".{SERVICE_TYPE}")
                    found[name] = gw
        browser.cancel()
    finally:
        zc.close()
    # One entry per gateway, however many names it answered under while renaming itself.
    gateways = list({g.key: g for g in found.values()}.values())
    fingerprints: dict[str, set[str]] = {}
    for gw in gateways:
        fingerprints.setdefault(gw.gateway_id, set()).add(gw.ca_fingerprint)
    for gw in gateways:
        paired = find_pairing(gw.gateway_id)
        pinned = paired.ca_fingerprint if paired is not None else ""
        if pinned and gw.ca_fingerprint != pinned and pinned in fingerprints[gw.gateway_id]:
            pinned = ""  # a namesake of the paired gateway, which is on the LAN too: unpaired
        gw.pinned_ca_fingerprint = pinned
    if measure:
        for gw in gateways:
            gw.rtt_ms = measure_rtt(gw, probes)
        gateways.sort(key=lambda g: (g.rtt_ms is None, g.rtt_ms or 0.0))
    return gateways


def measure_rtt(gateway: GatewayInfo, probes: int = 3, timeout_s: float = 2.0) -> float | None:
    """Median round trip to the gateway in ms, or None if it does not answer: an MQTT ping, or
    a TCP connect to a TLS listener this device may not speak MQTT to (unpaired, or its CA is
    not the pinned one). ``gateway.rtt_probe`` says which."""
    client_id = os.environ.get(ENV_CLIENT_ID) or default_client_id()
    if gateway.tls and (not gateway.paired or gateway.ca_changed):
        gateway.rtt_probe = "tcp"
        try:
            return statistics.median(connect_ms(gateway.broker, timeout_s) for _ in range(probes))
        except OSError:
            return None
    gateway.rtt_probe = "mqtt"
    try:
        tls, client_id = identity_for(gateway.broker, gateway.gateway_id, client_id)
        if gateway.tls and tls is None:
            return None  # paired by address only, not by this id: never plaintext to TLS
        conn = Connection(
            gateway.broker, gateway.gateway_id, client_id, timeout_s=timeout_s, tls=tls
        )
    except (HearthError, OSError, ValueError):
        return None
    try:
        samples = [conn.ping_ms(timeout_s) for _ in range(probes)]
    except (HearthError, OSError):
        return None
    finally:
        conn.close()
    return statistics.median(samples)
