"""Is an address on the LAN? Private data is only ever offloaded to a gateway that is."""

from __future__ import annotations

import functools
import ipaddress
import socket

__all__ = ["on_lan"]

# Loopback, RFC 1918, link-local, and their IPv6 counterparts (ULA, link-local).
_LAN_NETWORKS = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)


def on_lan(host: str) -> bool:
    """True for loopback, private (RFC 1918, IPv6 ULA) and link-local addresses, and for names
    that resolve only to those. Carrier NAT space (100.64/10) is not the LAN, and neither are
    the documentation ranges that Python's ``is_private`` counts in."""
    try:
        return _address_on_lan(host)
    except ValueError:  # a name: resolved each time, a cached answer could go stale
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            return False
        return bool(infos) and all(_address_on_lan(str(info[4][0])) for info in infos)


@functools.lru_cache(maxsize=256)
def _address_on_lan(address: str) -> bool:
    """Whether one IP address (text) is on the LAN; raises ValueError for a name. Cached: it is
    asked twice per offloaded call, and parsing the network list costs more than the check."""
    ip = ipaddress.ip_address(address)
    return any(ip.version == n.version and ip in n for n in _lan_networks())


@functools.cache
def _lan_networks() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n) for n in _LAN_NETWORKS)
