"""The device-side client: offload to a gateway, or run locally, per call.

Concurrency: paho's network thread delivers replies and resolves one ``Future`` per pending
request (keyed by Correlation Data); blocking calls wait on their future; the ``*_async`` forms
run the same code on a small named thread pool. ``close()`` is idempotent.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import paho.mqtt.client as mqtt

from hearth.discovery import GatewayInfo, discover
from hearth.errors import ErrorCode, GatewayUnavailable, HearthError, JobError
from hearth.pairing import identity_for
from hearth.placement import Decision, Estimates, Placement, decide
from hearth.protocol import (
    BlobChunk,
    BlobStored,
    DataClass,
    Error,
    NeedBlob,
    Notification,
    OnnxJob,
    OnnxResult,
    Ping,
    PipelineJob,
    Pong,
    Reply,
    Task,
    TaskControl,
    TaskInfo,
    TaskInstall,
    TaskList,
    TaskListResult,
    Timing,
    Trigger,
    WasmJob,
    WasmResult,
    decode_notification,
    decode_reply,
    decode_status,
    encode,
    notify_topic,
    reply_topic,
    request_topic,
    status_topic,
)
from hearth.runtime import installed
from hearth.transport import BrokerAddress, TlsFiles, connect, make_client, publish_properties
from hearth.vision import VisionCalls

__all__ = ["Client", "Inference", "WasmRun"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R", WasmResult, OnnxResult)

ENV_GATEWAY = "HEARTH_GATEWAY"  # HOST:PORT: skip discovery
ENV_INTERFACE = "HEARTH_INTERFACE"  # IP: discover only on this interface
ENV_CLIENT_ID = "HEARTH_CLIENT_ID"  # this device's id: owns its tasks, names its reply topics

_RECONNECT_BACKOFF_S = 2.0  # after a failed connect, run locally this long before retrying


@dataclass(frozen=True)
class WasmRun:
    """The result of ``run_wasm``: what the module did, and where and why it ran there."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    where: str  # "edge" | "local"
    reason: str
    latency_ms: float
    job_id: str
    gateway_id: str | None = None
    timing: Timing | None = None  # the gateway's queue and run time, when it ran there


@dataclass(frozen=True)
class Inference:
    outputs: dict[str, Any]  # name -> numpy array
    provider: str
    where: str
    reason: str
    latency_ms: float
    job_id: str
    gateway_id: str | None = None
    timing: Timing | None = None


@dataclass
class Stats:
    edge_calls: int = 0
    local_calls: int = 0
    fallbacks: int = 0
    blob_uploads: int = 0
    blob_bytes_sent: int = 0
    retries: int = 0


@dataclass
class _Blob:
    data: bytes
    sha256: str


class _Connection:
    """One MQTT connection to one gateway's broker."""

    def __init__(
        self,
        address: BrokerAddress,
        gateway_id: str | None,
        client_id: str,
        timeout_s: float,
        qos: int = 1,
        tls: TlsFiles | None = None,
    ) -> None:
        self.address = address
        self.qos = qos
        self.client_id = client_id
        self.gateway_id = gateway_id
        self.tls = tls  # the paired identity (hearth.pairing), for a gateway's device listener
        # A reply topic of this connection's own (under the device's prefix, as the gateway
        # requires): several clients with one device id do not receive each other's replies.
        self._reply_topic = f"{reply_topic(client_id)}/{uuid.uuid4().hex[:8]}"
        self._pending: dict[bytes, Future[Reply]] = {}
        # The broker's PUBACK is the only word on a publish its ACL refused (MQTT 5 0x87):
        # MQTT message id -> correlation, and acks that came before publish() returned.
        self._mids: dict[int, bytes] = {}
        self._early_acks: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.online = threading.Event()  # the gateway's retained status says online
        self.tier = "home"  # from that status: a cloud tier is never sent private work
        self.connected = threading.Event()
        self._subscribed = threading.Event()
        self._closed = False
        self._client = make_client(f"{client_id}-{uuid.uuid4().hex[:8]}", tls=tls)
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

    def _connected(self) -> None:
        status = status_topic(self.gateway_id) if self.gateway_id else "hearth/v1/gw/+/status"
        self._client.subscribe([(self._reply_topic, self.qos), (status, 1)])
        self.connected.set()

    def _disconnected(self, *_: Any) -> None:
        self.connected.clear()
        self._fail_all(GatewayUnavailable(f"lost the connection to {self.address}"))

    def _message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._reply_topic:
            correlation = getattr(msg.properties, "CorrelationData", None)
            with self._lock:
                future = self._pending.pop(correlation, None) if correlation else None
            if future is None:
                return  # a late answer to a call that already fell back or timed out
            try:
                future.set_result(decode_reply(msg.payload))
            except HearthError as exc:
                future.set_exception(exc)
            return
        try:
            status = decode_status(msg.payload)
        except HearthError:
            return
        if self.gateway_id is None and status.state == "online":
            self.gateway_id = status.gateway_id
        if status.gateway_id != self.gateway_id:
            return
        if status.state == "online":
            self.tier = status.tier
            self.online.set()
        else:
            # The gateway's Last Will (or its orderly goodbye): nothing pending will be answered.
            self.online.clear()
            self._fail_all(GatewayUnavailable(f"gateway {status.gateway_id} went offline"))

    def _published(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._lock:
            correlation = self._mids.pop(mid, None)
            if correlation is None:
                self._early_acks[mid] = reason
                return
        if reason.is_failure:
            self._refused(correlation, reason)

    def _refused(self, correlation: bytes, reason: Any) -> None:
        with self._lock:
            future = self._pending.pop(correlation, None)
        if future is None or future.done():
            return
        if reason.value == 0x87:  # Not authorized: the broker's ACL (unpaired, revoked, not ours)
            future.set_exception(JobError(
                ErrorCode.FORBIDDEN,
                f"the broker at {self.address} refused the request: not authorized for "
                f"{self.client_id} (not paired with this gateway, or revoked?)",
            ))  # fmt: skip
        else:
            future.set_exception(GatewayUnavailable(f"the broker refused the request: {reason}"))

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._mids.clear()
            self._early_acks.clear()
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)

    @property
    def usable(self) -> bool:
        return self.connected.is_set() and self.online.is_set() and not self._closed

    def expect(self, correlation: bytes) -> Future[Reply]:
        future: Future[Reply] = Future()
        with self._lock:
            self._pending[correlation] = future
        return future

    def forget(self, correlation: bytes) -> None:
        with self._lock:
            self._pending.pop(correlation, None)

    def publish(self, message: msgspec.Struct, correlation: bytes) -> int:
        if not self.usable or self.gateway_id is None:
            raise GatewayUnavailable(f"gateway at {self.address} is not online")
        payload = encode(message)
        info = self._client.publish(
            request_topic(self.gateway_id, self.client_id),
            payload,
            qos=self.qos,
            properties=publish_properties(self._reply_topic, correlation),
        )
        if self.qos > 0:
            with self._lock:
                early = self._early_acks.pop(info.mid, None)
                if early is None:
                    self._mids[info.mid] = correlation
            if early is not None and early.is_failure:
                self._refused(correlation, early)
        return len(payload)

    def request(self, message: msgspec.Struct, correlation: bytes, timeout_s: float) -> Reply:
        future = self.expect(correlation)
        try:
            self.publish(message, correlation)
            return future.result(timeout_s)
        except FutureTimeout:
            raise TimeoutError from None
        finally:
            self.forget(correlation)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail_all(GatewayUnavailable("client closed"))
        self._client.disconnect()
        self._client.loop_stop()


def task_install_request(
    module_sha256: str,
    name: str,
    *,
    on: Sequence[str] = (),
    every_s: float | None = None,
    read: Sequence[str] = (),
    may_publish: Sequence[str] = (),
    expires_at: float | None = None,
    idle_timeout_s: float | None = None,
    config: Mapping[str, str] | None = None,
    checkpoint_every: int = 1,
    checkpoint_every_s: float | None = None,
    data_class: DataClass = "private",
) -> TaskInstall:
    """The ``task_install`` message for a module already named by its hash (the options are
    those of ``Client.install_task``)."""
    triggers = [Trigger(topic=t) for t in on]
    if every_s is not None:
        triggers.append(Trigger(every_s=every_s))
    return TaskInstall(
        name=name,
        module=module_sha256,
        triggers=triggers,
        read=list(read),
        publish=list(may_publish),
        expires_at=expires_at,
        idle_timeout_s=idle_timeout_s,
        config=dict(config or {}),
        checkpoint_every=checkpoint_every,
        checkpoint_every_s=checkpoint_every_s,
        data_class=data_class,
    )


_LAN_NETWORKS = (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "::1/128", "fc00::/7", "fe80::/10",
)  # fmt: skip


def on_lan(host: str) -> bool:
    """True for loopback, private (RFC 1918, IPv6 ULA) and link-local addresses, and for names
    that resolve only to those. Carrier NAT space (100.64/10) is not the LAN, and neither are
    the documentation ranges that Python's ``is_private`` counts in."""
    import socket

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
def _local_runtimes_installed() -> bool:
    """Whether this device can run jobs itself (the ``local`` extra); asked on every call, and
    a failed import is not cached by Python, so the answer is."""
    return installed("onnxruntime") and installed("wasmtime")


@functools.cache
def _lan_networks() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n) for n in _LAN_NETWORKS)


def default_client_id() -> str:
    """A stable id for this device: it owns the device's tasks across restarts."""
    import re
    import socket

    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]) or "device"
    return f"dev-{host}"[:64]


class Client(VisionCalls):
    """Offload WebAssembly and ONNX jobs to a Hearth gateway, or run them here; call its vision
    capabilities (hearth.vision).

    >>> with Client(placement="auto") as hearth:          # doctest: +SKIP
    ...     run = hearth.run_wasm("filter.wasm", stdin=frame, args=["edges"])
    ...     print(run.where, run.reason, run.latency_ms)

    ``gateway``: a GatewayInfo from ``discover()``, "HOST:PORT", or None to use
    $HEARTH_GATEWAY or else mDNS discovery (on $HEARTH_INTERFACE / ``interface`` if set).
    """

    def __init__(
        self,
        gateway: GatewayInfo | str | None = None,
        *,
        client_id: str | None = None,
        placement: Placement | str = Placement.AUTO,
        interface: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 1,
        discover_timeout_s: float = 1.5,
        max_workers: int = 8,
        qos: int = 1,
    ) -> None:
        self._gateway_arg = gateway
        self.client_id = client_id or os.environ.get(ENV_CLIENT_ID) or default_client_id()
        self.placement = Placement(placement)
        self._interface = interface or os.environ.get(ENV_INTERFACE) or None
        self.timeout_s = timeout_s
        self.retries = retries
        # QoS 1 (the default) lets the broker's acknowledgements cover each hop; QoS 0 trades
        # that for latency on a LAN, and the journal and retries still make jobs run once.
        self.qos = qos
        self._discover_timeout_s = discover_timeout_s
        self._conn: _Connection | None = None
        self._conn_lock = threading.Lock()
        self._failed_at = -1e9
        self._last_failure = ""
        self._blobs: dict[str, _Blob] = {}
        # Concurrent calls naming the same new blob upload it once: the others wait on the lock
        # and find it uploaded (after their own request was sent) when they get it.
        self._upload_locks: dict[str, threading.Lock] = {}
        self._uploaded_at: dict[tuple[str | None, str], float] = {}
        self._estimates: dict[str, Estimates] = {}
        self._est_lock = threading.Lock()
        self._wasm_rt: Any = None
        self._onnx_rt: Any = None
        self._rt_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="hearth-call")
        self._closed = False
        self.stats = Stats()

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        for rt in (self._wasm_rt, self._onnx_rt):
            if rt is not None:
                rt.close()

    # -- gateway connection -------------------------------------------------------------------

    def _resolve(self) -> tuple[BrokerAddress, str | None]:
        gateway = self._gateway_arg or os.environ.get(ENV_GATEWAY) or None
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

    def connection(self) -> _Connection:
        """The live connection, connecting (or reconnecting) if needed. Raises
        GatewayUnavailable, quickly when a recent attempt failed."""
        with self._conn_lock:
            conn = self._conn
            if conn is not None and conn.usable:
                return conn
            if conn is not None and conn.connected.is_set():
                # Connected but the gateway is offline: wait for it to come back, not reconnect.
                raise GatewayUnavailable(f"gateway {conn.gateway_id} is offline")
            if time.monotonic() - self._failed_at < _RECONNECT_BACKOFF_S:
                raise GatewayUnavailable(self._last_failure)
            if conn is not None:
                conn.close()
                self._conn = None
            try:
                address, gateway_id = self._resolve()
                tls, self.client_id = identity_for(address, gateway_id, self.client_id)
                self._conn = _Connection(
                    address, gateway_id, self.client_id, self.timeout_s, self.qos, tls
                )
            except (GatewayUnavailable, ValueError, OSError) as exc:
                self._failed_at = time.monotonic()
                self._last_failure = str(exc)
                raise GatewayUnavailable(str(exc)) from None
            return self._conn

    def _off_lan(self, private: bool, mode: Placement) -> str | None:
        """Why this call must not be offloaded for its data class, or None."""
        if not private or mode is Placement.LOCAL:
            return None
        conn = self._conn
        if conn is not None and conn.tier == "cloud":
            return f"private data stays on the LAN; gateway {conn.gateway_id} is a cloud tier"
        outside = self._gateway_outside_lan()
        if outside is None:
            return None
        return f"private data stays on the LAN; gateway {outside} is not on it"

    def _gateway_outside_lan(self) -> str | None:
        """The gateway's address if it is not on the LAN (loopback, private or link-local);
        None if it is, or if no gateway is known yet (discovery only finds LAN neighbours, and
        the address it yields is checked again once connected)."""
        conn = self._conn
        if conn is not None:
            address = conn.address
        else:
            named = self._gateway_arg or os.environ.get(ENV_GATEWAY) or None
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

    def gateway_reachable(self) -> bool:
        try:
            self.connection()
        except GatewayUnavailable:
            return False
        return True

    def ping(self) -> float:
        """One round trip to the gateway, in ms."""
        conn = self.connection()
        started = time.perf_counter()
        reply = conn.request(Ping(), uuid.uuid4().bytes, self.timeout_s)
        if not isinstance(reply, Pong):
            raise GatewayUnavailable(f"unexpected answer to ping: {type(reply).__name__}")
        return (time.perf_counter() - started) * 1e3

    # -- public calls -------------------------------------------------------------------------

    def run_wasm(
        self,
        module: bytes | str | Path,
        stdin: bytes = b"",
        args: Sequence[str] = (),
        *,
        where: Placement | str | None = None,
        job_id: str | None = None,
        data_class: DataClass = "private",
    ) -> WasmRun:
        """Run a WASI command module: args and stdin in; stdout, stderr, exit code out.

        ``data_class``: "private" (the default) work is only ever offloaded to a gateway on the
        LAN. Raises JobError when the module fails (trap, limits...), wherever it ran."""
        blob = self._blob(module)
        job = WasmJob(
            job_id=job_id or uuid.uuid4().hex,
            module=blob.sha256,
            args=list(args),
            stdin=stdin,
            data_class=data_class,
        )
        return self._call(
            f"wasm:{blob.sha256}",
            where,
            lambda: self._edge_wasm(job, blob),
            lambda reason: self._local_wasm(job, blob, reason),
            private=data_class == "private",
        )

    def infer(
        self,
        model: bytes | str | Path,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] = (),
        *,
        where: Placement | str | None = None,
        job_id: str | None = None,
        data_class: DataClass = "private",
    ) -> Inference:
        """Run an ONNX model on named numpy arrays; returns named numpy arrays."""
        from hearth.runtime.onnx import array_to_tensor

        blob = self._blob(model)
        tensors = [array_to_tensor(name, value) for name, value in inputs.items()]
        job = OnnxJob(
            job_id=job_id or uuid.uuid4().hex,
            model=blob.sha256,
            inputs=tensors,
            outputs=list(outputs),
            data_class=data_class,
        )
        return self._call(
            f"onnx:{blob.sha256}",
            where,
            lambda: self._edge_onnx(job, blob),
            lambda reason: self._local_onnx(job, blob, reason),
            private=data_class == "private",
        )

    def run_wasm_async(self, *args: Any, **kwargs: Any) -> Future[WasmRun]:
        """Like run_wasm, without blocking: returns a concurrent.futures.Future."""
        return self._pool.submit(self.run_wasm, *args, **kwargs)

    def infer_async(self, *args: Any, **kwargs: Any) -> Future[Inference]:
        return self._pool.submit(self.infer, *args, **kwargs)

    # -- placement ----------------------------------------------------------------------------

    def _call(
        self,
        key: str,
        where: Placement | str | None,
        edge: Callable[[], tuple[T, float]],
        local: Callable[[str], T],
        *,
        private: bool = True,
    ) -> T:
        mode = Placement(where) if where is not None else self.placement
        # Private data never goes to a gateway off the LAN: checked before connecting to a
        # named gateway, and again once connected to a discovered one.
        why = self._off_lan(private, mode)
        gateway_ok = False
        if why is None:
            gateway_ok = mode is Placement.EDGE or (
                mode is Placement.AUTO and self.gateway_reachable()
            )
            why = self._off_lan(private, mode)
        if why is not None:
            if mode is Placement.EDGE:
                raise JobError(ErrorCode.FORBIDDEN, why)
            return local(why)
        conn = self._conn
        # Estimates are per gateway: a different box (after a failover) is measured afresh.
        key = f"{conn.gateway_id if conn else '-'}:{key}"
        with self._est_lock:
            estimates = self._estimates.setdefault(key, Estimates())
            estimates.calls += 1
        decision: Decision = decide(
            mode, gateway=gateway_ok, local=self._local_available(), estimates=estimates
        )
        if decision.where == "edge":
            try:
                result, ms = edge()
            except (GatewayUnavailable, TimeoutError) as exc:
                if not decision.fallback_ok:
                    raise GatewayUnavailable(str(exc) or "gateway timed out") from None
                self.stats.fallbacks += 1
                return local(f"fallback: {exc or 'gateway timed out'}")
            except JobError as exc:
                # policy_denied: private work this gateway may not run; this device may.
                local_ok = exc.code.retryable or exc.code is ErrorCode.POLICY_DENIED
                if not (decision.fallback_ok and local_ok):
                    raise
                self.stats.fallbacks += 1
                return local(f"fallback: gateway answered {exc.code}")
            with self._est_lock:
                estimates.record("edge", ms)
            self.stats.edge_calls += 1
            return dataclasses.replace(result, reason=decision.reason)  # type: ignore[type-var]
        started = time.perf_counter()
        result = local(decision.reason)
        with self._est_lock:
            estimates.record("local", (time.perf_counter() - started) * 1e3)
        return result

    def _local_available(self) -> bool:
        return _local_runtimes_installed()

    # -- edge ---------------------------------------------------------------------------------

    def _submit(
        self,
        conn: _Connection,
        job: WasmJob | OnnxJob | PipelineJob | TaskInstall,
        blob: _Blob,
        correlation: bytes | None = None,
    ) -> Reply:
        correlation = correlation or job.job_id.encode()  # type: ignore[union-attr]
        uploads = 0
        attempt = 0
        while True:
            sent_at = time.monotonic()
            try:
                reply = conn.request(job, correlation, self.timeout_s)
            except TimeoutError:
                if attempt >= self.retries:
                    raise
                attempt += 1
                self.stats.retries += 1
                continue  # same job id: the gateway runs it at most once
            if isinstance(reply, NeedBlob) and uploads < 2:
                uploads += 1
                with self._est_lock:
                    lock = self._upload_locks.setdefault(blob.sha256, threading.Lock())
                with lock:
                    key = (conn.gateway_id, blob.sha256)
                    if self._uploaded_at.get(key, -1.0) < sent_at:
                        # The blob gets the label of the work that needs it; the gateway keeps
                        # the first label it saw, so a blob once private stays private there.
                        self._upload(conn, blob, reply.max_chunk, job.data_class)
                        self._uploaded_at[key] = time.monotonic()
                continue
            if isinstance(reply, Error):
                job_id = getattr(job, "job_id", None)
                raise JobError(reply.code, reply.message, job_id=job_id, where="edge")
            return reply

    def _upload(
        self, conn: _Connection, blob: _Blob, max_chunk: int, data_class: DataClass = "private"
    ) -> None:
        correlation = f"blob-{blob.sha256}".encode()
        future = conn.expect(correlation)
        try:
            size = len(blob.data)
            chunk = max(1, min(max_chunk, 1 << 20))
            offset = 0
            while True:
                data = blob.data[offset : offset + chunk]
                part = BlobChunk(sha256=blob.sha256, size=size, offset=offset, data=data,
                                 data_class=data_class)  # fmt: skip
                conn.publish(part, correlation)
                self.stats.blob_bytes_sent += len(data)
                offset += len(data)
                if offset >= size:
                    break
            self.stats.blob_uploads += 1
            try:
                reply = future.result(self.timeout_s + size / 5e6)  # allow ~5 MB/s
            except FutureTimeout:
                raise TimeoutError("blob upload not acknowledged") from None
        finally:
            conn.forget(correlation)
        if isinstance(reply, Error):
            raise JobError(reply.code, reply.message, where="edge")
        if not isinstance(reply, BlobStored):
            raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")

    def _round_trip(
        self, job: WasmJob | OnnxJob, blob: _Blob, expected: type[R]
    ) -> tuple[R, float, str | None]:
        """Submit ``job`` and wait for its result: (reply, ms, gateway id)."""
        conn = self.connection()
        started = time.perf_counter()
        reply = self._submit(conn, job, blob)
        ms = (time.perf_counter() - started) * 1e3
        if not isinstance(reply, expected):
            raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")
        return reply, ms, conn.gateway_id

    def _edge_wasm(self, job: WasmJob, blob: _Blob) -> tuple[WasmRun, float]:
        reply, ms, gateway_id = self._round_trip(job, blob, WasmResult)
        run = WasmRun(
            exit_code=reply.exit_code,
            stdout=reply.stdout,
            stderr=reply.stderr,
            where="edge",
            reason="",
            latency_ms=ms,
            job_id=job.job_id,
            gateway_id=gateway_id,
            timing=reply.timing,
        )
        return run, ms

    def _edge_onnx(self, job: OnnxJob, blob: _Blob) -> tuple[Inference, float]:
        from hearth.runtime.onnx import tensor_to_array

        reply, ms, gateway_id = self._round_trip(job, blob, OnnxResult)
        result = Inference(
            outputs={t.name: tensor_to_array(t) for t in reply.outputs},
            provider=reply.provider,
            where="edge",
            reason="",
            latency_ms=ms,
            job_id=job.job_id,
            gateway_id=gateway_id,
            timing=reply.timing,
        )
        return result, ms

    # -- persistent tasks ---------------------------------------------------------------------

    def install_task(
        self,
        module: bytes | str | Path,
        name: str,
        *,
        on: Sequence[str] = (),
        every_s: float | None = None,
        read: Sequence[str] = (),
        may_publish: Sequence[str] = (),
        expires_at: float | None = None,
        idle_timeout_s: float | None = None,
        config: Mapping[str, str] | None = None,
        checkpoint_every: int = 1,
        checkpoint_every_s: float | None = None,
        data_class: DataClass = "private",
    ) -> TaskInfo:
        """Install a persistent task (docs/tasks.md) on the gateway, owned by this device.

        ``on``: MQTT topic filters that wake it; ``every_s``: a timer; ``read`` (default: the
        ``on`` filters) and ``may_publish``: its grants; ``expires_at`` (unix seconds) and
        ``idle_timeout_s`` (since this device was last seen): its lifetime. ``data_class``:
        the task's label (its module is uploaded with it); a private task (the default) is
        never installed on a gateway off the LAN or on a cloud tier: JobError ``forbidden``."""
        blob = self._blob(module)
        conn = self.connection()
        # Checked once connected, when the gateway's tier is known: the request itself carries
        # the task's config, so it must not even be sent.
        why = self._off_lan(data_class == "private", Placement.EDGE)
        if why is not None:
            raise JobError(ErrorCode.FORBIDDEN, why)
        request = task_install_request(
            blob.sha256,
            name,
            on=on,
            every_s=every_s,
            read=read,
            may_publish=may_publish,
            expires_at=expires_at,
            idle_timeout_s=idle_timeout_s,
            config=config,
            checkpoint_every=checkpoint_every,
            checkpoint_every_s=checkpoint_every_s,
            data_class=data_class,
        )
        reply = self._submit(conn, request, blob, uuid.uuid4().bytes)
        return self._task_info(reply)

    def tasks(self) -> list[TaskInfo]:
        """This device's tasks on the gateway."""
        reply = self.connection().request(TaskList(), uuid.uuid4().bytes, self.timeout_s)
        if isinstance(reply, Error):
            raise JobError(reply.code, reply.message)
        if not isinstance(reply, TaskListResult):
            raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")
        return list(reply.tasks)

    def task(self, task_id: str, action: str = "show") -> TaskInfo:
        """Show, pause, resume or cancel one of this device's tasks."""
        request = TaskControl(task_id=task_id, action=action)  # type: ignore[arg-type]
        reply = self.connection().request(request, uuid.uuid4().bytes, self.timeout_s)
        return self._task_info(reply)

    @staticmethod
    def _task_info(reply: Reply) -> TaskInfo:
        if isinstance(reply, Error):
            raise JobError(reply.code, reply.message)
        if not isinstance(reply, Task):
            raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")
        return reply.task

    def notifications(
        self, callback: Callable[[Notification], None], *, session_expiry_s: int = 7 * 86400
    ) -> Callable[[], None]:
        """Deliver this device's task notifications to ``callback`` (on paho's thread).

        Uses a persistent MQTT session: notifications sent while the device slept arrive when
        it calls this again with the same client id. Returns a function that stops it."""
        conn = self.connection()
        client = make_client(f"{self.client_id}-notify", tls=conn.tls)
        topic = notify_topic(self.client_id)

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                callback(decode_notification(msg.payload))
            except HearthError:
                log.warning("ignoring a malformed notification")

        def subscribe() -> None:
            client.subscribe(topic, qos=1)

        client.on_message = on_message
        connect(
            client,
            conn.address,
            clean_start=False,
            session_expiry_s=session_expiry_s,
            on_connected=subscribe,
        )

        def stop() -> None:
            client.disconnect()
            client.loop_stop()

        return stop

    # -- local --------------------------------------------------------------------------------

    def _wasm_runtime(self) -> Any:
        with self._rt_lock:
            if self._wasm_rt is None:
                from hearth.runtime.wasm import WasmRuntime

                self._wasm_rt = WasmRuntime()
            return self._wasm_rt

    def _onnx_runtime(self) -> Any:
        with self._rt_lock:
            if self._onnx_rt is None:
                from hearth.runtime.onnx import OnnxRuntime

                self._onnx_rt = OnnxRuntime()
            return self._onnx_rt

    def _local_wasm(self, job: WasmJob, blob: _Blob, reason: str) -> WasmRun:
        started = time.perf_counter()
        try:
            outcome = self._wasm_runtime().run(
                blob.sha256, args=job.args, stdin=job.stdin, wasm=blob.data
            )
        except JobError as exc:
            exc.where, exc.job_id = "local", job.job_id
            raise
        self.stats.local_calls += 1
        return WasmRun(
            exit_code=outcome.exit_code,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            where="local",
            reason=reason,
            latency_ms=(time.perf_counter() - started) * 1e3,
            job_id=job.job_id,
        )

    def _local_onnx(self, job: OnnxJob, blob: _Blob, reason: str) -> Inference:
        from hearth.runtime.onnx import tensor_to_array

        started = time.perf_counter()
        try:
            tensors, provider = self._onnx_runtime().run(
                blob.sha256, job.inputs, job.outputs, model=blob.data
            )
        except JobError as exc:
            exc.where, exc.job_id = "local", job.job_id
            raise
        self.stats.local_calls += 1
        return Inference(
            outputs={t.name: tensor_to_array(t) for t in tensors},
            provider=provider,
            where="local",
            reason=reason,
            latency_ms=(time.perf_counter() - started) * 1e3,
            job_id=job.job_id,
        )

    # -- blobs --------------------------------------------------------------------------------

    def _blob(self, source: bytes | str | Path) -> _Blob:
        key = source if isinstance(source, str | Path) else None
        if key is not None:
            cached = self._blobs.get(str(key))
            if cached is not None:
                return cached
            data = Path(source).read_bytes()  # type: ignore[arg-type]
        else:
            data = bytes(source)  # type: ignore[arg-type]
        blob = _Blob(data, hashlib.sha256(data).hexdigest())
        if key is not None:
            self._blobs[str(key)] = blob
        return blob
