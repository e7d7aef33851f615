"""mDNS/DNS-SD advertisement of ``_hearth._tcp.local.`` with the gateway's capabilities in TXT
records (docs/protocol.md lists the keys). Load is refreshed, but only re-announced when it
changed noticeably, to keep multicast chatter low on a home LAN.

A real LAN has two ``raspberrypi``s. The instance name (what people see: the host name unless
``mdns_name`` says otherwise) is probed before it is announced, and when another responder
already owns it this gateway renames itself as RFC 6762 §9 (and RFC 6763 §4.1's example) says:
``raspberrypi (2)``, then ``(3)``...; its host record gets ``-2``, ``-3``. The gateway id stays
in the TXT record ``id``: devices key gateways by that id and the CA fingerprint, never by the
instance name, so a renamed gateway is the same gateway to them."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Iterable

import ifaddr
from zeroconf import IPVersion, NonUniqueNameException, ServiceInfo, Zeroconf

from hearth.protocol import SERVICE_TYPE
from hearth.transport import BrokerAddress

__all__ = ["Advertiser", "advertised_addresses", "default_instance_name"]

log = logging.getLogger(__name__)

_MAX_RENAMES = 32  # past "(32)" something other than a crowd of namesakes is wrong
_LABEL_BYTES = 63  # a DNS label's limit (the instance name is one label)
# Interfaces no LAN device reaches the box through: container and VM bridges, their veths, VPN
# tunnels. Their addresses are neither advertised nor put in the device listener's certificate
# (mdns_interface names the one to use when the guess is wrong).
_VIRTUAL = (
    "docker", "br-", "veth", "virbr", "cni", "flannel", "cali", "podman", "lxcbr", "lxdbr",
    "vmnet", "vboxnet", "tailscale", "zt", "tun", "wg",
)  # fmt: skip


def default_instance_name() -> str:
    """This host's name: what two boxes set up the same way share."""
    return socket.gethostname().split(".")[0] or "hearth"


def advertised_addresses(
    broker: BrokerAddress, interface_ip: str | None, named: Iterable[str] | None = None
) -> list[str]:
    """The addresses devices should use: the broker's own if it listens on one address, else
    the mDNS interface's, else every non-loopback IPv4 address of the box but those of virtual
    interfaces (``_VIRTUAL``: docker0, a VPN...). ``named``: the IP
    addresses the listener's TLS certificate names; an address it does not name (a docker
    bridge, a VPN that came up after the certificate was issued) would fail the device's
    certificate check, so it is not advertised."""
    host = broker.host
    if host not in ("0.0.0.0", "::", ""):
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            return [socket.gethostbyname(host)]
    if interface_ip:
        return [interface_ip]
    addresses = [
        str(ip.ip)
        for adapter in ifaddr.get_adapters()
        if not adapter.nice_name.startswith(_VIRTUAL)
        for ip in adapter.ips
        if ip.is_IPv4 and not str(ip.ip).startswith("127.")
    ]
    if named is not None:
        allowed = set(named)
        addresses = [a for a in addresses if a in allowed]
    return addresses or ["127.0.0.1"]


def _host_label(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", name).strip("-")[:_LABEL_BYTES] or "hearth"


class Advertiser:
    """One service registration on one Zeroconf instance; ``start`` resolves a name conflict
    by renaming (see the module's docstring), ``close`` is idempotent."""

    def __init__(
        self,
        gateway_id: str,
        broker: BrokerAddress,
        properties: dict[str, str],
        interface_ip: str | None = None,
        *,
        name: str | None = None,
        addresses: list[str] | None = None,
    ) -> None:
        self.gateway_id = gateway_id
        self.addresses = addresses or advertised_addresses(broker, interface_ip)
        # Bind mDNS where the broker is reachable: a loopback broker is only announced on
        # loopback (never multicast out of a real interface for it).
        if interface_ip is None and all(a.startswith("127.") for a in self.addresses):
            interface_ip = "127.0.0.1"
        if interface_ip:
            self._zc = Zeroconf(interfaces=[interface_ip], ip_version=IPVersion.V4Only)
        else:
            self._zc = Zeroconf(ip_version=IPVersion.V4Only)
        base = (name or gateway_id).strip() or gateway_id
        # Room for " (NN)" in the one label an instance name is.
        self._base = base.encode()[: _LABEL_BYTES - 5].decode(errors="ignore")
        self.instance_name = self._base  # the name finally owned (after start)
        self._port = broker.port
        self._properties = dict(properties)
        self._info = self._make_info(1)
        self._lock = threading.Lock()
        self._closed = False

    def _make_info(self, number: int) -> ServiceInfo:
        instance = self._base if number == 1 else f"{self._base} ({number})"
        host = _host_label(self._base) + ("" if number == 1 else f"-{number}")
        return ServiceInfo(
            SERVICE_TYPE,
            f"{instance}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in self.addresses],
            port=self._port,
            properties=self._properties,
            server=f"{host}.local.",
        )

    def start(self) -> bool:
        """Probe and announce, renaming on a conflict (zeroconf's own ``allow_name_change``
        renames to ``name-2``; RFC 6763 §4.1's ``name (2)`` is what people expect to see).
        False, said in the log, when every name tried was taken: the gateway serves on
        without mDNS rather than crash-loop under ``Restart=on-failure``."""
        for number in range(1, _MAX_RENAMES + 1):
            info = self._make_info(number)
            try:
                self._zc.register_service(info)
            except NonUniqueNameException:
                continue
            with self._lock:
                self._info = info
                self.instance_name = info.name.removesuffix(f".{SERVICE_TYPE}")
            if number > 1:
                log.warning(
                    "mDNS name %r is taken on this LAN: advertising as %r instead (RFC 6762 "
                    "section 9); devices know this gateway by its id %s",
                    self._base,
                    self.instance_name,
                    self.gateway_id,
                )
            log.info(
                "advertising %r (id %s) at %s:%d",
                self.instance_name,
                self.gateway_id,
                ",".join(self.addresses),
                self._port,
            )
            return True
        log.error(
            "mDNS: %r and %d renames of it are all taken on this LAN; not advertising (set "
            "mdns_name)",
            self._base,
            _MAX_RENAMES - 1,
        )
        return False

    def update(self, properties: dict[str, str]) -> None:
        with self._lock:
            if self._closed or properties == self._properties:
                return
            self._properties = dict(properties)
            info = self._info
            self._info = ServiceInfo(
                SERVICE_TYPE,
                info.name,
                addresses=[socket.inet_aton(a) for a in self.addresses],
                port=self._port,
                properties=self._properties,
                server=info.server,
            )
            self._zc.update_service(self._info)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._zc.unregister_service(self._info)
        finally:
            self._zc.close()
