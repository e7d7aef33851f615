"""mDNS/DNS-SD advertisement of ``_hearth._tcp.local.`` with the gateway's capabilities in TXT
records (docs/protocol.md lists the keys). Load is refreshed, but only re-announced when it
changed noticeably, to keep multicast chatter low on a home LAN."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading

import ifaddr
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from hearth.protocol import SERVICE_TYPE
from hearth.transport import BrokerAddress

__all__ = ["Advertiser", "advertised_addresses"]

log = logging.getLogger(__name__)


def advertised_addresses(broker: BrokerAddress, interface_ip: str | None) -> list[str]:
    """The addresses devices should use: the broker's own if it listens on one address, else
    the mDNS interface's, else every non-loopback IPv4 address of the box."""
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
        for ip in adapter.ips
        if ip.is_IPv4 and not str(ip.ip).startswith("127.")
    ]
    return addresses or ["127.0.0.1"]


class Advertiser:
    def __init__(
        self,
        gateway_id: str,
        broker: BrokerAddress,
        properties: dict[str, str],
        interface_ip: str | None = None,
    ) -> None:
        self._addresses = advertised_addresses(broker, interface_ip)
        # Bind mDNS where the broker is reachable: a loopback broker is only announced on
        # loopback (never multicast out of a real interface for it).
        if interface_ip is None and all(a.startswith("127.") for a in self._addresses):
            interface_ip = "127.0.0.1"
        if interface_ip:
            self._zc = Zeroconf(interfaces=[interface_ip], ip_version=IPVersion.V4Only)
        else:
            self._zc = Zeroconf(ip_version=IPVersion.V4Only)
        self._name = f"{gateway_id}.{SERVICE_TYPE}"
        self._port = broker.port
        self._server = f"{gateway_id}.local."
        self._properties = dict(properties)
        self._info = self._make_info()
        self._lock = threading.Lock()
        self._closed = False

    def _make_info(self) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            self._name,
            addresses=[socket.inet_aton(a) for a in self._addresses],
            port=self._port,
            properties=self._properties,
            server=self._server,
        )

    def start(self) -> None:
        self._zc.register_service(self._info)
        log.info("advertising %s at %s:%d", self._name, ",".join(self._addresses), self._port)

    def update(self, properties: dict[str, str]) -> None:
        with self._lock:
            if self._closed or properties == self._properties:
                return
            self._properties = dict(properties)
            self._info = self._make_info()
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
