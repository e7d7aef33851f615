"""Which gateway a client talks to, its one live connection, and whether private work may go
there: named (``HOST:PORT``, ``$HEARTH_GATEWAY``, a ``GatewayInfo``) or found over mDNS."""

from __future__ import annotations

import os
import threading
import time

from hearth._connection import Connection
from hearth._identity import identity_for
from hearth._lan import on_lan
from hearth.discovery import GatewayInfo, discover
from hearth.errors import GatewayUnavailable
from hearth.placement import Placement
from hearth.transport import BrokerAddress

__all__ = ["ENV_GATEWAY", "ENV_INTERFACE", "GatewayLink"]

ENV_GATEWAY = "HEARTH_GATEWAY"  # HOST:PORT: skip discovery
ENV_INTERFACE = "HEARTH_INTERFACE"  # IP: discover only on this interface

_RECONNECT_BACKOFF_S = 2.0  # after a failed connect, run locally this long before retrying


class GatewayLink:
    """Connects on first use and again after a loss, but not more often than every
    ``_RECONNECT_BACKOFF_S``: meanwhile calls fail fast (and ``auto`` runs them here)."""

    def __init__(
        self,
        gateway: GatewayInfo | str | None,
        client_id: str,
        *,
        interface: str | None,
        timeout_s: float,
        discover_timeout_s: float,
        qos: int,
    ) -> None:
        self._gateway = gateway
        self.client_id = client_id  # the paired id replaces the default one on connecting
        self._interface = interface or os.environ.get(ENV_INTERFACE) or None
        self._timeout_s = timeout_s
        self._discover_timeout_s = discover_timeout_s
        self._qos = qos
        self._lock = threading.Lock()
        self.current: Connection | None = None
        self._failed_at = -1e9
        self.last_failure = ""

    def _named(self) -> GatewayInfo | str | None:
        return self._gateway or os.environ.get(ENV_GATEWAY) or None

    def _resolve(self) -> tuple[BrokerAddress, str | None]:
        gateway = self._named()
        if isinstance(gateway, GatewayInfo):
            return gateway.broker, gateway.gateway_id
        if isinstance(gateway, str):
            return BrokerAddress.parse(gateway), None
        found = discover(self._discover_timeout_s, interface=self._interface, measure=True)
        if not found:
            raise GatewayUnavailable("no gateway found over mDNS")
        # Measured round trip first, then load: discover() sorts by RTT; prefer an idle one
        # among those within a millisecond of the fastest.
        reachable = [g for g in found if g.rtt_ms is not None] or found
        fastest = reachable[0].rtt_ms or 0.0
        near = [g for g in reachable if (g.rtt_ms or 0.0) <= fastest + 1.0]
        best = min(near, key=lambda g: g.load)
        return best.broker, best.gateway_id

    def connection(self) -> Connection:
        """The live connection, connecting (or reconnecting) if needed. Raises
        GatewayUnavailable, quickly when a recent attempt failed."""
        with self._lock:
            conn = self.current
            if conn is not None and conn.usable:
                return conn
            if conn is not None and conn.connected.is_set():
                # Connected but the gateway is offline: wait for it to come back, not reconnect.
                raise GatewayUnavailable(f"gateway {conn.gateway_id} is offline")
            if time.monotonic() - self._failed_at < _RECONNECT_BACKOFF_S:
                raise GatewayUnavailable(self.last_failure)
            if conn is not None:
                conn.close()
                self.current = None
            try:
                address, gateway_id = self._resolve()
                tls, self.client_id = identity_for(address, gateway_id, self.client_id)
                self.current = Connection(
                    address,
                    gateway_id,
                    self.client_id,
                    timeout_s=self._timeout_s,
                    qos=self._qos,
                    tls=tls,
                )
            except (GatewayUnavailable, ValueError, OSError) as exc:
                self._failed_at = time.monotonic()
                self.last_failure = str(exc)
                raise GatewayUnavailable(str(exc)) from None
            return self.current

    def reachable(self) -> bool:
        try:
            self.connection()
        except GatewayUnavailable:
            return False
        return True

    def off_lan(self, private: bool, mode: Placement) -> str | None:
        """Why a call must not be offloaded for its data class, or None."""
        if not private or mode is Placement.LOCAL:
            return None
        conn = self.current
        if conn is not None and conn.tier == "cloud":
            return f"private data stays on the LAN; gateway {conn.gateway_id} is a cloud tier"
        outside = self._outside_lan()
        if outside is None:
            return None
        return f"private data stays on the LAN; gateway {outside} is not on it"

    def _outside_lan(self) -> str | None:
        """The gateway's address if it is not on the LAN (loopback, private or link-local);
        None if it is, or if no gateway is known yet (discovery only finds LAN neighbours, and
        the address it yields is checked again once connected)."""
        conn = self.current
        if conn is not None:
            address = conn.address
        else:
            named = self._named()
            if isinstance(named, GatewayInfo):
                address = named.broker
            elif isinstance(named, str):
                try:
                    address = BrokerAddress.parse(named)
                except ValueError:
                    return None
            else:
                return None
        return None if on_lan(address.host) else str(address)

    def close(self) -> None:
        with self._lock:
            if self.current is not None:
                self.current.close()
                self.current = None
