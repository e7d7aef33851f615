"""Which gateway a client talks to, its one live connection, and whether private work may go
there: named (``HOST:PORT``, a gateway id, ``$HEARTH_GATEWAY``, a ``GatewayInfo``), else the
paired gateway that answered quickest last time if its last address still answers (no
discovery: ``hearth._known``), else found over mDNS.

A connection lost, or a gateway gone offline, costs the calls in flight latency, not errors:
each waits (``when_usable``) for the link to be usable again, on one named thread for all of
them, and is sent again under its job id; the gateway's journal answers a job it has seen
with its one answer. Replies go to one reply topic for the link's whole life, so an answer on
its way when the connection broke still finds the connection that replaced it.
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

from hearth._connection import Connection
from hearth._futures import running
from hearth._known import KnownGateway, known_gateways, resolve_name
from hearth._lan import on_lan
from hearth._tls_probe import connect_ms
from hearth._trust import Target, changed_identity, secure_identity
from hearth.discovery import GatewayInfo, discover
from hearth.errors import GatewayUnavailable, HearthError, NotPaired
from hearth.placement import Placement
from hearth.transport import BrokerAddress

__all__ = ["ENV_GATEWAY", "ENV_INTERFACE", "GatewayLink"]

ENV_GATEWAY = "HEARTH_GATEWAY"  # HOST:PORT or a gateway id: skip discovery
ENV_INTERFACE = "HEARTH_INTERFACE"  # IP: discover only on this interface

_RECONNECT_BACKOFF_S = 2.0  # after a failed connect, run locally this long before retrying
_WAIT_POLL_S = 0.05  # how often the waiting calls' thread looks at the link
# A stored gateway's last address is tried with a TCP connect this patient: on a LAN it answers
# in milliseconds, and one that does not should cost little before discovery takes over.
_STORED_PROBE_S = 0.5


class GatewayLink:
    """Connects on first use and again after a loss, but not more often than every
    ``_RECONNECT_BACKOFF_S``: meanwhile calls fail fast (and ``auto`` runs them here), and the
    calls in flight wait for it (``when_usable``)."""

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
        self._failure: GatewayUnavailable | None = None
        # One reply topic suffix for the link's life: see the module's docstring.
        self._reply_suffix = uuid.uuid4().hex[:8]
        self._waiting = _Waiting(self._usable_now)
        # The paired gateway connected to, as the device's store knows it (None: unpaired).
        self.known: KnownGateway | None = None
        self.how = ""  # how the gateway was found: named, stored, discovered
        self.found_ms = 0.0  # how long finding it and connecting took

    @property
    def pairing_needed(self) -> NotPaired | None:
        """Why the last attempt to connect failed, when it failed for want of a (current)
        pairing."""
        return self._failure if isinstance(self._failure, NotPaired) else None

    @property
    def last_failure(self) -> str:
        return str(self._failure) if self._failure is not None else ""

    def _named(self) -> GatewayInfo | str | None:
        return self._gateway or os.environ.get(ENV_GATEWAY) or None

    @property
    def named(self) -> GatewayInfo | str | None:
        """The gateway this link was given (argument or $HEARTH_GATEWAY); None: discovered."""
        return self._named()

    @property
    def discover_timeout_s(self) -> float:
        return self._discover_timeout_s

    @property
    def interface(self) -> str | None:
        return self._interface

    def _resolve(self) -> Target:
        gateway = self._named()
        if isinstance(gateway, GatewayInfo):
            self.how = "named"
            return _target(gateway)
        if isinstance(gateway, str):
            self.how = "named"
            return self._by_name(gateway)
        self.how = "discovered"
        found = discover(self._discover_timeout_s, interface=self._interface, measure=True)
        if not found:
            raise GatewayUnavailable("no gateway found over mDNS")
        # Only gateways this device may talk to: plain ones, and TLS ones it is paired with.
        usable = [g for g in found if not g.tls or (g.paired and not g.ca_changed)]
        if not usable:
            return _target(found[0])  # connecting explains: pair first, or its CA changed
        # Measured round trip first, then load: discover() sorts by RTT; prefer an idle one
        # among those within a millisecond of the fastest.
        reachable = [g for g in usable if g.rtt_ms is not None] or usable
        fastest = reachable[0].rtt_ms or 0.0
        near = [g for g in reachable if (g.rtt_ms or 0.0) <= fastest + 1.0]
        return _target(min(near, key=lambda g: g.load))

    def _by_name(self, name: str) -> Target:
        """``HOST:PORT`` (or an IP literal), ``ID@HOST:PORT`` (gateway ``ID`` on that broker:
        a pool's id, say, which no single gateway announces), else a gateway id: a paired one
        at its last address, else the one discovery finds by that id, else a host name after
        all."""
        gateway_id, at, where = name.rpartition("@")
        if at:
            return Target(BrokerAddress.parse(where), gateway_id or None)
        if ":" in name or _is_ip(name) or name == "localhost":
            return Target(BrokerAddress.parse(name))
        known = resolve_name(name)
        if known is not None:
            try:
                connect_ms(known.address, _STORED_PROBE_S)
            except OSError:
                pass  # not at its last address (a new DHCP lease?): look for it on the LAN
            else:
                self.how = "stored"
                return _stored(known)
        self.how = "discovered"
        found = discover(self._discover_timeout_s, interface=self._interface, measure=False)
        same = [g for g in found if g.gateway_id == name]
        if len({g.ca_fingerprint for g in same}) > 1:
            prints = ", ".join(g.ca_fingerprint[:16] for g in same)
            raise GatewayUnavailable(
                f"{len(same)} gateways on the LAN call themselves {name!r} (CA fingerprints "
                f"{prints}...): name one by HOST:PORT, or give them distinct ids (gateway_id)"
            )
        if same:
            return _target(same[0])
        self.how = "named"
        return Target(BrokerAddress.parse(name))

    def _stored_targets(self) -> list[Target]:
        """Paired gateways whose last address answers a TCP connect now, the quickest last
        time first; each one's store entry updated with the round trip just measured."""
        answering = []
        for known in known_gateways():
            try:
                rtt = connect_ms(known.address, _STORED_PROBE_S)
            except OSError:
                continue
            known.rtt_ms = rtt
            answering.append(_stored(known))
        return answering

    def connection(self) -> Connection:
        """The live connection, connecting (or reconnecting) if needed. Raises
        GatewayUnavailable, quickly when a recent attempt failed (NotPaired when this device
        must pair first, GatewayIdentityChanged when the gateway's CA is not the pinned one)."""
        with self._lock:
            conn = self.current
            if conn is not None and conn.usable:
                return conn
            if conn is not None and conn.connected.is_set() and not conn.closed:
                # Connected but the gateway is offline: wait for it to come back, not reconnect.
                raise GatewayUnavailable(conn.lost or f"gateway {conn.gateway_id} is offline")
            if time.monotonic() - self._failed_at < _RECONNECT_BACKOFF_S:
                raise self._again()
            if conn is not None:
                conn.close()
                self.current = None
            try:
                self.current = self._connect()
            except (GatewayUnavailable, ValueError, OSError) as exc:
                self._failed_at = time.monotonic()
                self._failure = (
                    exc
                    if isinstance(exc, GatewayUnavailable)
                    else (GatewayUnavailable(str(exc) or type(exc).__name__))
                )
                raise self._again() from None
            self._failure = None
            return self.current

    def _again(self) -> GatewayUnavailable:
        """The last failure again, as the same kind of exception (a NotPaired stays one)."""
        failure = self._failure or GatewayUnavailable("no gateway reachable")
        if isinstance(failure, NotPaired):
            return failure
        return GatewayUnavailable(str(failure) or "no gateway reachable")

    def _connect(self) -> Connection:
        started = time.perf_counter()
        conn = self._find_and_open()
        self.found_ms = (time.perf_counter() - started) * 1e3
        return conn

    def _find_and_open(self) -> Connection:
        if self._named() is None:
            for target in self._stored_targets():
                with contextlib.suppress(GatewayUnavailable):
                    self.how = "stored"
                    return self._open(target)
        return self._open(self._resolve())

    @property
    def found(self) -> str:
        """How the gateway connected to was found, and how long finding and connecting took:
        what ``hearth run --explain`` says."""
        if self.current is None or not self.how:
            return ""
        how = {
            "stored": "its stored address, no discovery",
            "named": "named",
            "discovered": "found over mDNS",
        }[self.how]
        return f"{how}; connected in {self.found_ms:.0f} ms"

    def _open(self, target: Target) -> Connection:
        conn = self._open_unrecorded(target)
        self._remember(conn)
        return conn

    def _remember(self, conn: Connection) -> None:
        """Keep where a paired gateway answered, and one MQTT round trip to it (the store's
        last address and RTT: the next process tries it first)."""
        known = resolve_name(conn.gateway_id) if conn.gateway_id else None
        self.known = known
        if known is None:
            return
        try:
            rtt: float | None = conn.ping_ms(min(self._timeout_s, 2.0))
        except (HearthError, OSError):
            rtt = None
        known.answered(conn.address, rtt)
        known.save()

    def _open_unrecorded(self, target: Target) -> Connection:
        tls, self.client_id = secure_identity(target, self.client_id, self._timeout_s)
        try:
            return Connection(
                target.address,
                target.gateway_id,
                self.client_id,
                timeout_s=self._timeout_s,
                qos=self._qos,
                tls=tls,
                reply_suffix=self._reply_suffix,
            )
        except GatewayUnavailable as exc:
            changed = changed_identity(target, exc, self._timeout_s) if tls else None
            if changed is not None:
                raise changed from None
            raise

    def _usable_now(self) -> Connection | None:
        """For the waiting calls: a usable connection, or None (and why, in last_failure)."""
        try:
            return self.connection()
        except NotPaired:
            raise
        except GatewayUnavailable:
            return None

    def when_usable(self, until: float) -> Future[Connection]:
        """The link's connection once it is usable again; GatewayUnavailable (saying why) if it
        is not by ``until`` (monotonic), NotPaired at once if it never will be."""
        return self._waiting.add(until)

    def why_unusable(self) -> str:
        conn = self.current
        if conn is not None and conn.lost:
            return conn.lost
        return self.last_failure or "no gateway reachable"

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
            elif isinstance(named, str) and (":" in named or _is_ip(named) or "@" in named):
                try:
                    address = BrokerAddress.parse(named.rpartition("@")[2])
                except ValueError:
                    return None
            elif isinstance(named, str):
                # A gateway id: where it was last seen, else found on the LAN (checked again
                # once connected, like a discovered one).
                known = resolve_name(named)
                if known is None:
                    return None
                address = known.address
            else:
                return None
        return None if on_lan(address.host) else str(address)

    def close(self) -> None:
        self._waiting.close()
        with self._lock:
            if self.current is not None:
                self.current.close()
                self.current = None


def _target(gateway: GatewayInfo) -> Target:
    return Target(
        gateway.broker,
        gateway.gateway_id,
        tls=gateway.tls,
        pairing_port=gateway.pairing_port,
        ca_fingerprint=gateway.ca_fingerprint,
    )


def _stored(known: KnownGateway) -> Target:
    return Target(
        known.address,
        known.gateway_id,
        tls=True,
        pairing_port=known.pairing.pairing_port or None,
        ca_fingerprint=known.ca_fingerprint,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class _Waiting:
    """Calls waiting for the link to be usable again, each until its own deadline, watched by
    one named thread (started when the first one waits, ended by ``close``): a call that waits
    holds no thread of its own."""

    def __init__(self, usable_now: Callable[[], Connection | None]) -> None:
        self._usable_now = usable_now
        self._heap: list[tuple[float, int, Future[Connection]]] = []
        self._order = itertools.count()  # ties: never compare futures
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, until: float) -> Future[Connection]:
        future: Future[Connection] = running()
        with self._cond:
            if self._closed:
                future.set_exception(GatewayUnavailable("client closed"))
                return future
            heapq.heappush(self._heap, (until, next(self._order), future))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="hearth-reconnect", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                conn = self._usable_now()
            except GatewayUnavailable as exc:  # never usable (NotPaired): tell them all now
                self._settle(exc, everyone=True)
                continue
            if conn is not None:
                self._settle(conn, everyone=True)
                continue
            self._settle(GatewayUnavailable("not back in time"))
            with self._cond:
                if not self._closed:
                    self._cond.wait(_WAIT_POLL_S)

    def _settle(self, outcome: Connection | BaseException, *, everyone: bool = False) -> None:
        """Complete the waiting futures: every one, or those whose deadline passed."""
        now = time.monotonic()
        with self._cond:
            done = []
            while self._heap and (everyone or self._heap[0][0] <= now):
                done.append(heapq.heappop(self._heap)[2])
        for future in done:
            with contextlib.suppress(InvalidStateError):
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            waiting = [entry[2] for entry in self._heap]
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        for future in waiting:
            with contextlib.suppress(InvalidStateError):
                future.set_exception(GatewayUnavailable("client closed"))
        if thread is not None and thread is not threading.current_thread():
            thread.join()
