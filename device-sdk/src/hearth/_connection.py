"""One MQTT connection to one gateway's broker: requests out, one ``Future`` per pending reply.

Concurrency: paho's network thread delivers replies and completes the future waiting for each
(keyed by Correlation Data); one named deadline thread fails the futures whose reply is overdue.
Nobody else waits: a blocking call waits on its future, an async one chains on it. Every
completion goes through ``_resolve`` or ``_fail``, so a reply and its deadline arriving
together cannot both win. ``close()`` is idempotent.

The gateway may be a pool of cloud-tier gateways sharing one id (docs/pool.md): the member that
takes a job says so (``accepted``, or a ``need_blob`` naming it), and everything more for that
job (its blob, its re-sends) goes to that member's own request topic. The connection watches
each such member's status; on its Last Will, the calls it held and those no member had taken
yet fail with GatewayUnavailable, and their owners send them again under the same job id, to
the pool, as they do when a single gateway comes back.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

import msgspec
import paho.mqtt.client as mqtt

from hearth.errors import ErrorCode, GatewayUnavailable, HearthError, JobError
from hearth.protocol import (
    Accepted,
    GatewayStatus,
    NeedBlob,
    Ping,
    Pong,
    Reply,
    decode_reply,
    decode_status,
    encode,
    reply_topic,
    request_topic,
    status_topic,
)
from hearth.transport import (
    BrokerAddress,
    TlsFiles,
    connect,
    fast_publish_decoding,
    make_client,
    publish_properties,
)

__all__ = ["Connection"]

_NOT_AUTHORIZED = 0x87  # MQTT 5 reason code: the broker's ACL refused a publish
_MAX_ROUTES = 65536  # calls routed to a pool member, kept until answered: a bound, not a need


def _resolve(future: Future[Reply], reply: Reply) -> None:
    with contextlib.suppress(InvalidStateError):  # its deadline or a lost connection came first
        future.set_result(reply)


def _fail(future: Future[Reply], exc: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # its reply came first
        future.set_exception(exc)


_COMPACT_AT = 256


class _Deadlines:
    """Fails pending futures whose reply is overdue, from one thread, so that an async call
    needs no thread of its own to notice a silent gateway. Started on first use."""

    def __init__(self, expire: Callable[[bytes, Future[Reply], float], None]) -> None:
        self._expire = expire
        self._heap: list[tuple[float, int, bytes, Future[Reply], float]] = []
        # Answered calls stay in the heap until their deadline comes up; past this size it is
        # rebuilt without them, so that it holds about the calls in flight, not every call of
        # the last timeout_s (thousands of futures, with their answers, for the collector to
        # walk again and again).
        self._compact_at = _COMPACT_AT
        self._order = itertools.count()  # ties: never compare futures
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, timeout_s: float, correlation: bytes, future: Future[Reply]) -> None:
        entry = (time.monotonic() + timeout_s, next(self._order), correlation, future, timeout_s)
        with self._cond:
            if self._closed:
                return
            heapq.heappush(self._heap, entry)
            if len(self._heap) > self._compact_at:
                self._heap = [e for e in self._heap if not e[3].done()]
                heapq.heapify(self._heap)
                self._compact_at = max(_COMPACT_AT, 2 * len(self._heap))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="hearth-deadlines", daemon=True
                )
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()  # sooner than what the thread sleeps towards

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    while self._heap and self._heap[0][3].done():
                        heapq.heappop(self._heap)  # answered in time
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                _, _, correlation, future, timeout_s = heapq.heappop(self._heap)
            self._expire(correlation, future, timeout_s)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


class Connection:
    """One MQTT connection to one gateway's broker."""

    def __init__(
        self,
        address: BrokerAddress,
        gateway_id: str | None,
        client_id: str,
        *,
        timeout_s: float,
        qos: int = 1,
        tls: TlsFiles | None = None,
        reply_suffix: str | None = None,
    ) -> None:
        self.address = address
        self.qos = qos
        self.client_id = client_id
        self.gateway_id = gateway_id
        self.tls = tls  # the paired identity (hearth.pairing), for a gateway's device listener
        # A reply topic of this connection's own (under the device's prefix, as the gateway
        # requires): several clients with one device id do not receive each other's replies.
        # A client's link passes one suffix to each connection it makes: an answer published
        # to the old one's topic reaches the connection that replaced it.
        suffix = reply_suffix or uuid.uuid4().hex[:8]
        self._reply_topic = f"{reply_topic(client_id)}/{suffix}"
        self._pending: dict[bytes, Future[Reply]] = {}
        # Replies that do not end a request (a migratable run's checkpoints): shown to this
        # callback first; True means it took the reply and the request goes on.
        self._interim: dict[bytes, Callable[[Reply], bool]] = {}
        # The broker's PUBACK is the only word on a publish its ACL refused (MQTT 5 0x87):
        # MQTT message id -> correlation, and acks that came before publish() returned.
        self._mids: dict[int, bytes] = {}
        self._early_acks: dict[int, Any] = {}
        # MQTT message id -> what to call when the broker acknowledged it (upload progress).
        self._on_acked: dict[int, Callable[[], None]] = {}
        # A pool's members (the gateway id is a pool's): correlation -> the member holding the
        # call, and the members whose status this connection watches. Kept after the answer
        # (bounded): the upload after a ``need_blob`` and any later call under that job id go
        # to that member, whose journal answers it at most once.
        self._routes: dict[bytes, str] = {}
        self._members: set[str] = set()
        self._lock = threading.Lock()
        self._deadlines = _Deadlines(self._expire)
        self.online = threading.Event()  # the gateway's retained status says online
        self.tier = "home"  # from that status: a cloud tier is never sent private work
        self.status: GatewayStatus | None = None  # the last online status (what it offers)
        self.connected = threading.Event()
        self._subscribed = threading.Event()
        self._closed = False
        self.lost = ""  # why it is not usable now, once it was: for the calls that wait
        self._client = make_client(f"{client_id}-{uuid.uuid4().hex[:8]}", tls=tls)
        fast_publish_decoding(self._client)  # replies and statuses: the hot path
        self._client.on_message = self._message
        self._client.on_publish = self._published
        self._client.on_disconnect = self._disconnected
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        connect(self._client, address, timeout_s=timeout_s, on_connected=self._connected)
        if not self._subscribed.wait(timeout_s):
            self.close()
            raise GatewayUnavailable(f"broker {address} did not confirm our subscriptions")
        # The retained status tells us whether (and which) gateway serves this broker.
        if not self.online.wait(timeout_s):
            self.close()
            raise GatewayUnavailable(f"no Hearth gateway online at {address}")

    def receiving(self) -> tuple[int, int] | None:
        """(bytes received, size) of the MQTT packet arriving now, for a download's progress
        bar; None between packets. paho delivers a message only whole and has no hook for its
        parts, so this reads its packet buffer (paho-mqtt 2.2, pinned in constraints.txt): a
        racy read of two ints, for display only; any other paho shows no bar."""
        packet = getattr(self._client, "_in_packet", None)
        try:
            if not packet or not packet["have_remaining"]:
                return None
            size, left = int(packet["remaining_length"]), int(packet["to_process"])
        except (KeyError, TypeError, ValueError):
            return None
        # All of it here: it is being handled (its reply may be delivered already), not
        # arriving; paho resets the buffer only after its callbacks return.
        return (size - left, size) if left else None

    # -- paho's thread ----------------------------------------------------------------------

    def _connected(self) -> None:
        status = status_topic(self.gateway_id) if self.gateway_id else "hearth/v1/gw/+/status"
        with self._lock:
            members = [(status_topic(m), 1) for m in sorted(self._members)]
        self._client.subscribe([(self._reply_topic, self.qos), (status, 1), *members])
        self.connected.set()

    def _disconnected(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        self.connected.clear()
        if self._closed:
            return
        self.lost = f"lost the connection to the broker at {self.address} ({reason})"
        self._fail_all(GatewayUnavailable(self.lost))

    def _message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._reply_topic:
            self._reply(msg)
        else:
            self._status(msg)

    def _reply(self, msg: mqtt.MQTTMessage) -> None:
        correlation: bytes = getattr(msg.properties, "CorrelationData", None) or b""
        with self._lock:
            future = self._pending.get(correlation) if correlation else None
            interim = self._interim.get(correlation) if future is not None else None
        if future is None:
            return  # a late answer to a call that already fell back or timed out
        try:
            reply = decode_reply(msg.payload)
        except HearthError as exc:
            self.forget(correlation, future)
            _fail(future, exc)
            return
        if isinstance(reply, Accepted):  # a pool member took it; the answer follows
            self.route(correlation, reply.gateway_id)
            return
        if interim is not None and interim(reply):
            return
        self.forget(correlation, future)
        if isinstance(reply, NeedBlob) and isinstance(reply.gateway_id, str):
            self.route(correlation, reply.gateway_id)  # the upload and re-send go there
        _resolve(future, reply)

    def _status(self, msg: mqtt.MQTTMessage) -> None:
        try:
            status = decode_status(msg.payload)
        except HearthError:
            return
        with self._lock:
            member = status.gateway_id in self._members
        if member and status.gateway_id != self.gateway_id:
            if status.state != "online":
                self._member_lost(status.gateway_id)
            return
        if self.gateway_id is None and status.state == "online":
            self.gateway_id = status.gateway_id
        if status.gateway_id != self.gateway_id:
            return
        if status.state == "online":
            self.tier = status.tier
            self.status = status
            self.lost = ""
            self.online.set()
        else:
            # The gateway's Last Will (or its orderly goodbye): nothing pending will be answered
            # on this connection before the gateway is back.
            self.online.clear()
            self.lost = f"gateway {status.gateway_id} went offline (its Last Will, or it stopped)"
            self._fail_all(GatewayUnavailable(self.lost))

    def _published(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._lock:
            correlation = self._mids.pop(mid, None)
            acked = self._on_acked.pop(mid, None) if self._on_acked else None
            if correlation is None:
                self._early_acks[mid] = reason
                return
        if acked is not None:
            acked()
        if reason.is_failure:
            self._refused(correlation, reason)

    def _refused(self, correlation: bytes, reason: Any) -> None:
        with self._lock:
            future = self._pending.pop(correlation, None)
        if future is None:
            return
        if reason.value == _NOT_AUTHORIZED:  # the broker's ACL: unpaired, revoked, not ours
            exc: HearthError = JobError(
                ErrorCode.FORBIDDEN,
                f"the broker at {self.address} refused the request: not authorized for "
                f"{self.client_id} (not paired with this gateway, or revoked?)",
            )
        else:
            exc = GatewayUnavailable(f"the broker refused the request: {reason}")
        _fail(future, exc)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._interim.clear()
            self._mids.clear()
            self._early_acks.clear()
            self._on_acked.clear()
        for future in pending.values():
            _fail(future, exc)

    # -- a pool's members ----------------------------------------------------------------------

    def route(self, correlation: bytes, member: str) -> None:
        """Send what follows for ``correlation`` to ``member`` (a member of the pool this
        connection's gateway id names), and watch that member's status from now on."""
        if member == self.gateway_id:
            return
        with self._lock:
            if len(self._routes) >= _MAX_ROUTES:
                self._routes.pop(next(iter(self._routes)))
            self._routes[correlation] = member
            new = member not in self._members
            self._members.add(member)
        if new:  # its retained status comes at once: a member already dead is seen dead
            self._client.subscribe(status_topic(member), 1)

    def member(self, correlation: bytes) -> str | None:
        """The pool member that took the call ``correlation`` (None: the gateway itself)."""
        with self._lock:
            return self._routes.get(correlation)

    def _member_lost(self, member: str) -> None:
        """A pool member's Last Will: fail the calls it held and the calls no member has
        taken yet (one may have been on its way to it; the broker gives a dead session's
        messages to no other member). Their owners send them to the pool again."""
        with self._lock:
            held = {c for c, m in self._routes.items() if m == member}
            for correlation in held:
                del self._routes[correlation]
            lost = {c: f for c, f in self._pending.items() if c in held or c not in self._routes}
            for correlation in lost:
                del self._pending[correlation]
                self._interim.pop(correlation, None)
        why = f"pool member {member} went offline (its Last Will) holding this call"
        for future in lost.values():
            _fail(future, GatewayUnavailable(why))

    # -- the deadline thread ------------------------------------------------------------------

    def _expire(self, correlation: bytes, future: Future[Reply], timeout_s: float) -> None:
        with self._lock:
            if self._pending.get(correlation) is future:
                del self._pending[correlation]
                self._interim.pop(correlation, None)
        who = f"gateway {self.gateway_id}" if self.gateway_id else f"the gateway at {self.address}"
        _fail(future, TimeoutError(f"no answer from {who} within {timeout_s:.3g} s"))

    # -- callers' threads ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def usable(self) -> bool:
        return self.connected.is_set() and self.online.is_set() and not self._closed

    def expect(
        self,
        correlation: bytes,
        timeout_s: float | None = None,
        *,
        interim: Callable[[Reply], bool] | None = None,
    ) -> Future[Reply]:
        """A future for the reply carrying ``correlation``; it raises TimeoutError after
        ``timeout_s`` (None: only a reply or a lost connection completes it). ``interim`` sees
        each reply first and keeps the ones that do not end the request (it returns True)."""
        future: Future[Reply] = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            self._pending[correlation] = future
            if interim is not None:
                self._interim[correlation] = interim
        if timeout_s is not None:
            self._deadlines.add(timeout_s, correlation, future)
        return future

    def forget(self, correlation: bytes, future: Future[Reply] | None = None) -> None:
        """Stop waiting for ``correlation`` (only if it is still ``future``'s, when given)."""
        with self._lock:
            if future is None or self._pending.get(correlation) is future:
                self._pending.pop(correlation, None)
                self._interim.pop(correlation, None)

    def publish(
        self,
        message: msgspec.Struct,
        correlation: bytes,
        on_acked: Callable[[], None] | None = None,
    ) -> int:
        """Publish a request (or a blob chunk); returns its size in bytes. ``on_acked``: called
        once the broker has it (its PUBACK; at once with QoS 0), e.g. for a progress bar."""
        if not self.usable or self.gateway_id is None:
            raise GatewayUnavailable(self.lost or f"gateway at {self.address} is not online")
        payload = encode(message)
        with self._lock:
            gateway = self._routes.get(correlation, self.gateway_id)
        info = self._client.publish(
            request_topic(gateway, self.client_id),
            payload,
            qos=self.qos,
            properties=publish_properties(self._reply_topic, correlation),
        )
        if self.qos > 0:
            with self._lock:
                early = self._early_acks.pop(info.mid, None)
                if early is None:
                    self._mids[info.mid] = correlation
                    if on_acked is not None:
                        self._on_acked[info.mid] = on_acked
            if early is not None and early.is_failure:
                self._refused(correlation, early)
            elif early is not None and on_acked is not None:
                on_acked()
        elif on_acked is not None:
            on_acked()  # QoS 0: handed to the network, the most there is to know
        return len(payload)

    def send(
        self, message: msgspec.Struct, correlation: bytes, timeout_s: float | None = None
    ) -> Future[Reply]:
        """Publish a request and return the future of its reply, without waiting. Raises
        GatewayUnavailable at once when the gateway is not online."""
        future = self.expect(correlation, timeout_s)
        try:
            self.publish(message, correlation)
        except BaseException:
            self.forget(correlation, future)
            raise
        return future

    def request(self, message: msgspec.Struct, correlation: bytes, timeout_s: float) -> Reply:
        """``send`` and wait: the reply, or TimeoutError after ``timeout_s``."""
        return self.send(message, correlation, timeout_s).result()

    def ping_ms(self, timeout_s: float) -> float:
        """One round trip to the gateway, in ms."""
        started = time.perf_counter()
        reply = self.request(Ping(), uuid.uuid4().bytes, timeout_s)
        if not isinstance(reply, Pong):
            raise GatewayUnavailable(f"unexpected answer to ping: {type(reply).__name__}")
        return (time.perf_counter() - started) * 1e3

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail_all(GatewayUnavailable("connection closed"))
        self._deadlines.close()
        self._client.disconnect()
        self._client.loop_stop()
