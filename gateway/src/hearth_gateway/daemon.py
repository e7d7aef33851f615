"""Wires the gateway together and runs it until SIGTERM/SIGINT.

Start order: state, broker, workers, MQTT link, journal resume, mDNS. Stop order: mDNS goes,
new jobs are refused with shutting_down (devices fall back to local), queued and running jobs
finish and are answered, then the retained status goes offline, then exit 0.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from hearth.protocol import GatewayStatus, encode
from hearth.protocol.pairing import pair_request_filter
from hearth.runtime.limits import WasmLimits
from hearth.transport import BrokerAddress
from hearth_gateway import __version__, _systemd
from hearth_gateway._logging import journal_stream
from hearth_gateway.accelerators import ChoiceCache, accelerator_names, available_providers
from hearth_gateway.acl import GATEWAY_USER, BrokerSecurity
from hearth_gateway.blobs import BlobStore
from hearth_gateway.broker import BrokerEvents, ManagedBroker
from hearth_gateway.config import Config, default_gateway_id, default_state_dir
from hearth_gateway.control import ControlServer
from hearth_gateway.crypto import Sealer
from hearth_gateway.discovery import Advertiser, advertised_addresses, default_instance_name
from hearth_gateway.dispatch import RESERVED_CLIENT_ID, Dispatcher
from hearth_gateway.errors import ConfigError
from hearth_gateway.fit import Resources
from hearth_gateway.ha import GatewayFigures, HomeAssistant
from hearth_gateway.home import HomeLink, HomeTarget
from hearth_gateway.link import GatewayLink
from hearth_gateway.loop import Loop, Timer
from hearth_gateway.metrics import Metrics, StateSample
from hearth_gateway.pairing import PairingService, pairing_for
from hearth_gateway.peers import peers_for
from hearth_gateway.placement import Load, Placer
from hearth_gateway.policy import HOME_PREFIX, Admission, Policy, load_policy
from hearth_gateway.pool import pool_link_options
from hearth_gateway.reply_to import ReplyTo
from hearth_gateway.runners import REGISTRY, TaskEvent, WorkerSettings
from hearth_gateway.runs import REASON_STOPPING
from hearth_gateway.status import StatusSnapshot, write_snapshot
from hearth_gateway.storage import StorageGuard, is_storage_full
from hearth_gateway.store import Receipt, Store
from hearth_gateway.streams import StreamCounters
from hearth_gateway.tasks import ADMIN, TaskManager
from hearth_gateway.upstream import Forwarded, forwarder_for
from hearth_gateway.web import WebServer, web_server_for
from hearth_gateway.workers import QueuedJob, WorkerPool

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

_HOUSEKEEPING_S = 2.0
# How long acknowledgements made ready by an answered turn's commit wait for the next turn's
# answers to travel with (under load the next turn comes sooner).
_ACK_DELAY_S = 0.005
# With jobs waiting for a worker, the journal's commits are grouped: at most one per this long
# (the answers are out already; the PUBACKs wait for their group). Otherwise each turn commits.
_COMMIT_EVERY_S = 0.002


def _check(config: Config) -> None:
    """ConfigError for a configuration no gateway can run with."""
    unknown = [r for r in config.runners if r not in REGISTRY]
    if unknown:
        raise ConfigError(f"unknown runners {unknown}; known: {sorted(REGISTRY)}")
    if config.tier == "cloud" and config.upstream:
        raise ConfigError("a cloud-tier gateway has no upstream (it serves public work only)")


class Gateway:
    """The daemon. ``start()`` brings it up, ``close()`` (idempotent) takes it down."""

    # The end of each turn of the loop (_end_of_turn): timers that wake a turn to release the
    # acknowledgements waiting, or for a grouped commit, which may come from _commit_due on.
    _ack_timer: Timer | None = None
    _commit_timer: Timer | None = None
    _commit_due = 0.0

    def __init__(self, config: Config) -> None:
        self.config = config
        self.gateway_id = config.gateway_id or default_gateway_id()
        self.state_dir = Path(config.state_dir) if config.state_dir else default_state_dir()
        _check(config)
        self.policy: Policy = load_policy(Path(p) for p in config.policies)
        try:
            self.listen = BrokerAddress.parse(config.broker or config.listen)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.providers = available_providers() if {"onnx", "vision"} & set(config.runners) else []
        # Which provider each model got (the workers decide; status shows it).
        self.choices = ChoiceCache.for_box(self.state_dir / "cache") if self.providers else None
        # What the workers report they provide (name -> version), for status and mDNS.
        self.capabilities: dict[str, str] = {}
        self.started_at = time.time()
        self._stopping = False
        self._closed = False
        self.broker: ManagedBroker | None = None
        self.worker_network = "unknown"
        self.advertiser: Advertiser | None = None
        self.loop = Loop()
        # Any write on the loop that fails for space marks the directory full instead of
        # logging a traceback (the paths that answer a device map it to storage_full first).
        self.loop.on_error = self._storage_error
        self._last_status = b""
        self._last_gc = 0.0
        self._watchdog_s = _systemd.watchdog_interval_s()

        # Everything the daemon writes (journal, blobs, keys later) is private to it.
        os.umask(0o077)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.storage, self.store, self.blobs = self._open_state()
        self.metrics = Metrics()  # /metrics and the owner's page (metrics.py, web/)
        self.admission = Admission(self.policy.limits)
        self.streams = StreamCounters(self.policy.vision.max_streams)  # in status from the start
        workers = config.workers or os.cpu_count() or 1
        self.pool = WorkerPool(
            self.loop,
            self._worker_settings(workers),
            workers,
            self._completed,
            wasm_timeout_s=self.policy.wasm.wall_timeout_s,
            onnx_timeout_s=self.policy.onnx.wall_timeout_s,
            task_timeout_s=self.policy.tasks.wall_timeout_s,
            vision_timeout_s=self.policy.vision.wall_timeout_s,
            run_timeout_s=self.policy.migration.wall_timeout_s,
            recycle=self.policy.workers,
            progress=self._progress,
            started=self._started,
        )
        # The daemon's account on the managed broker, new at each start (docs/security.md).
        self._broker_password = secrets.token_urlsafe(32)
        self.link = GatewayLink(
            self.loop,
            self.listen,
            self.gateway_id,
            on_request=self._handle,
            offline_status=encode(self._status("offline")),
            on_other=self._other,
            credentials=None if config.broker else (GATEWAY_USER, self._broker_password),
            **pool_link_options(config, self.gateway_id, self._status("online")),
        )
        # The upstream that may take public jobs, and placement, which decides where jobs run.
        self.upstream = forwarder_for(
            config,
            self.loop,
            self.gateway_id,
            policy=self.policy.placement,
            blobs=self.blobs,
            audit=self.store.audit,
            relay=self._relay,
            fallback=self._fall_back,
        )
        # Paired gateways on the LAN that take work when this one is saturated (peers.py).
        self.peers = peers_for(
            self.state_dir,
            self.gateway_id,
            config.tier,
            self.loop,
            policy=self.policy.placement,
            blobs=self.blobs,
            audit=self.store.audit,
            relay=self._relay,
            fallback=self._fall_back,
        )
        placer = Placer(
            tier=config.tier,
            policy=self.policy.placement,
            runners=set(config.runners),
            load=self._load,
            store=self.store,
            blob_class=self.blobs.data_class,
            upstream=self.upstream.state if self.upstream is not None else None,
            peers=self.peers.consider if self.peers is not None else None,
            run_peers=self.peers.consider_run if self.peers is not None else None,
        )
        # The home's own broker (home.py): "home:" topics of tasks, Home Assistant (ha.py).
        self.home_link = self._home_link()
        self.tasks: TaskManager | None = None
        if "task" in config.runners:
            self.tasks = TaskManager(
                loop=self.loop,
                store=self.store,
                blobs=self.blobs,
                pool=self.pool,
                policy=self.policy.tasks,
                max_chunk=self.policy.limits.max_chunk_bytes,
                publish=self._task_publish,
                subscribe=self._task_subscribe,
                storage=self.storage,
                home_broker=self.home_link is not None,
                metrics=self.metrics,
            )
        # The managed broker's $SYS: source addresses (for pairing's audit), drops.
        self.broker_events = BrokerEvents()  # subscribed in start(), with a managed broker
        self.pairing: PairingService | None = pairing_for(
            config,
            gateway_id=self.gateway_id,
            state_dir=self.state_dir,
            store=self.store,
            loop=self.loop,
            publish=self.link.publish_reply,
            on_change=self._security_changed,
            peer=self.broker_events.address_of,
        )
        if self.pairing is not None:
            self.link.subscribe(pair_request_filter(), True)
        self.dispatcher = Dispatcher(
            gateway_id=self.gateway_id,
            policy=self.policy,
            store=self.store,
            blobs=self.blobs,
            admission=self.admission,
            pool=self.pool,
            runners=list(config.runners),
            publish=self._publish_reply,
            placer=placer,
            upstream=self.upstream,
            tasks=self.tasks,
            streams=self.streams,
            locked=self.pairing.locked if self.pairing is not None else frozenset(),
            storage=self.storage,
            pool_id=config.pool,
            resources=self._resources,
            peers=self.peers,
            metrics=self.metrics,
        )
        self.loop.after(self._end_of_turn)
        self.control: ControlServer | None = None
        self.ha = self._home_assistant()
        self.web: WebServer | None = web_server_for(
            config,
            gateway_id=self.gateway_id,
            state_dir=self.state_dir,
            metrics=self.metrics,
            control_path=self.state_dir / "control.sock",
            # With pairing, its certificate already names every address of the box.
            tls_hosts=None if self.pairing is not None else self._web_hosts(),
        )

    # The home broker (home.py): a task's "home:" topics go there, its messages come back
    # to the tasks with the prefix; the gateway's own topics there are ha.py's.

    def _home_link(self) -> HomeLink | None:
        target = HomeTarget.from_config(self.config, self.gateway_id)
        if target is None:
            return None
        return HomeLink(
            self.loop,
            target,
            self.gateway_id,
            on_message=self._home_message,
            on_connected=self._home_connected,
        )

    def _home_assistant(self) -> HomeAssistant | None:
        """The status mirror, and discovery with home_assistant = true."""
        if self.home_link is None:
            return None
        return HomeAssistant(
            self.home_link,
            self.gateway_id,
            figures=self._home_figures,
            tasks=lambda: self.tasks.list_tasks(ADMIN).tasks if self.tasks else [],
            control=self.dispatcher.task_request,
            audit=self.store.audit,
            discovery=self.config.home_assistant,
            prefix=self.config.home_assistant_prefix,
        )

    def _task_publish(self, topic: str, payload: bytes) -> None:
        if topic.startswith(HOME_PREFIX) and self.home_link is not None:
            self.home_link.publish(topic.removeprefix(HOME_PREFIX), payload)
        else:
            self._publish_plain(topic, payload)

    def _task_subscribe(self, topic_filter: str, on: bool) -> None:
        if topic_filter.startswith(HOME_PREFIX) and self.home_link is not None:
            self.home_link.subscribe(topic_filter.removeprefix(HOME_PREFIX), on)
        else:
            self.link.subscribe(topic_filter, on)

    def _home_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if self.ha is not None and self.ha.owns(topic):
            self.ha.on_message(topic, payload, retained)
        elif not retained and self.tasks is not None:
            self._other(HOME_PREFIX + topic, payload)

    def _home_connected(self) -> None:
        if self.ha is not None:
            self.ha.connected()

    def _home_figures(self) -> GatewayFigures:
        storage = self.storage.state()
        return GatewayFigures(
            queue_length=self.admission.in_flight,
            busy_workers=self.pool.busy,
            workers=self.pool.size,
            jobs_completed=self.dispatcher.counters.completed,
            paired_devices=len(self.pairing.active) if self.pairing is not None else 0,
            storage_free_bytes=storage.free_bytes,
            storage_full=storage.full,
        )

    def _end_of_turn(self) -> None:
        """Each turn of the loop ends with the journal's commit (its writes of the turn), then
        the acknowledgements of the requests the commit covers. Answers went out as their jobs
        ended (dispatch.py ``completed``: the commit is not on their way). Under load (jobs
        waiting for a worker) the commits of several turns are grouped, one per
        _COMMIT_EVERY_S. After a turn that answered, the acknowledgements wait for the next
        answer, to leave in one TCP segment with it (one wake-up of the broker, not two), or
        for _ACK_DELAY_S at most."""
        now = time.monotonic()
        if self.pool.pending and now < self._commit_due:
            if self._commit_timer is None:
                self._commit_timer = self.loop.call_later(self._commit_due - now, self._commit_wake)
        elif self.dispatcher.flush():
            self._commit_due = now + _COMMIT_EVERY_S
        elif self._commit_timer is None:  # the journal was checkpointing: a little later
            self._commit_timer = self.loop.call_later(_COMMIT_EVERY_S, self._commit_wake)
        if not self.link.take_answered():
            self.link.release_acks()
        elif self.link.acks_waiting and self._ack_timer is None:
            self._ack_timer = self.loop.call_later(_ACK_DELAY_S, self._acks_due)

    def _commit_wake(self) -> None:
        """Wake a turn of the loop, whose end commits what waits (the grouped commit is
        due)."""
        self._commit_timer = None
        self._commit_due = 0.0

    def _acks_due(self) -> None:
        """Wake a turn of the loop, whose end releases the acknowledgements waiting."""
        self._ack_timer = None

    # Callbacks of the link, the pool and the forwarder, which exist before the dispatcher
    # does: they reach it through the daemon.

    def _handle(self, topic: str, payload: bytes, reply_to: ReplyTo) -> Receipt | None:
        self.metrics.received(len(payload))
        try:
            if self.pairing is not None and self.pairing.owns(topic):
                self.pairing.handle(topic, payload, reply_to)
                return None
            return self.dispatcher.handle(topic, payload, reply_to)
        except Exception as exc:
            if not self._storage_error(exc):
                raise
            return None

    def _completed(self, item: QueuedJob, reply: bytes, final: bool) -> None:
        if isinstance(item.job, TaskEvent):
            if self.tasks is not None:
                self.tasks.completed(item, reply, final)
            return
        self.dispatcher.completed(item, reply, final)

    def _storage_error(self, exc: BaseException) -> bool:
        """True when ``exc`` says the disk is full: noted (the guard logs it once), no
        traceback. Anything else is left to the caller's handler."""
        if not is_storage_full(exc):
            return False
        self.storage.hit(exc)
        return True

    def _progress(self, item: QueuedJob, frame: bytes) -> None:
        self.dispatcher.progress(item, frame)

    def _started(self, item: QueuedJob) -> None:
        self.dispatcher.started(item)

    def _relay(self, item: Forwarded, reply: bytes) -> None:
        self.dispatcher.forwarded(item, reply)

    def _fall_back(self, item: Forwarded, why: str) -> None:
        self.dispatcher.forward_failed(item, why)

    def _broker_security(self) -> BrokerSecurity:
        if self.pairing is not None:
            return self.pairing.broker_security(self._broker_password)
        return BrokerSecurity(gateway_id=self.gateway_id, password=self._broker_password)

    def _security_changed(self) -> None:
        """A device paired or was revoked: the dispatcher, the broker's ACLs and the device's
        tasks (suspended) follow now, before the owner's command returns."""
        if self.pairing is not None:
            self.dispatcher.locked = self.pairing.locked
            if self.tasks is not None:
                self.tasks.owners_revoked(self.pairing.locked)
        if self.broker is not None:
            self.broker.update_security(self._broker_security())

    def _publish_reply(self, reply_to: ReplyTo, payload: bytes) -> None:
        self.metrics.sent(len(payload))
        self.link.publish_reply(reply_to, payload)

    def _publish_plain(self, topic: str, payload: bytes) -> None:
        self.metrics.sent(len(payload))
        self.link.publish_plain(topic, payload)

    def _web_hosts(self) -> set[str]:
        """Every name a browser on the LAN may use for the page: its certificate names them."""
        assert self.config.web_listen
        web = BrokerAddress.parse(self.config.web_listen, default_port=8787)
        lan = advertised_addresses(web, self.config.mdns_interface or None)
        return {"localhost", "127.0.0.1", "::1", f"{self.gateway_id}.local", *lan}

    def _observe(self) -> None:
        """The metrics' gauges and the page's charts, read here on the loop (metrics.py)."""
        count, size = self.store.blob_totals()
        journal = self.store.stats()
        tasks: dict[str, int] = {}
        if self.tasks is not None:
            for info in self.tasks.list_tasks(RESERVED_CLIENT_ID).tasks:
                tasks[info.state] = tasks.get(info.state, 0) + 1
        self.metrics.observe(
            StateSample(
                online=not self._stopping,
                broker_connected=self.link.connected,
                upstream_connected=self.upstream is not None and self.upstream.link.ready,
                workers=self.pool.size,
                busy_workers=self.pool.busy,
                queue_depth=self.admission.in_flight,
                worker_restarts=self.pool.restarts,
                workers_recycled=self.pool.recycled,
                blobs=count,
                blob_bytes=size,
                journal_bytes=journal.journal_bytes,
                journal_file_bytes=journal.file_bytes,
                audit_rows=journal.audit_rows,
                paired_devices=len(self.pairing.active) if self.pairing is not None else 0,
                storage_free_bytes=self.storage.state().free_bytes,
                tasks=tasks,
                at=time.time(),
            )
        )

    def _other(self, topic: str, payload: bytes) -> None:
        self.metrics.received(len(payload))
        if BrokerEvents.owns(topic):
            self.broker_events.on_message(topic, payload)
            return
        if self.tasks is None:
            return
        try:
            self.tasks.on_message(topic, payload)
        except Exception as exc:
            if not self._storage_error(exc):
                raise

    def _load(self) -> Load:
        return Load(workers=self.pool.size, busy=self.pool.busy, waiting=self.pool.pending)

    def _resources(self) -> Resources:
        """What a job's ``requires`` may ask of this box (fit.py)."""
        return Resources(
            providers=tuple(self.providers),
            declared=tuple(self.config.accelerators),
            capabilities=frozenset(self.capabilities),
            job_memory_bytes=self.policy.workers.max_rss_bytes,
            wasm_memory_bytes=self.policy.wasm.memory_bytes,
        )

    def _status(self, state: str) -> GatewayStatus:
        in_flight = self.admission.in_flight
        size = self.pool.size
        resources = self._resources()
        return GatewayStatus(
            gateway_id=self.gateway_id,
            state="online" if state == "online" else "offline",
            version=__version__,
            tier=self.config.tier,
            runners=list(self.config.runners),
            providers=self.providers,
            accelerators=list(resources.accelerators),
            memory_mb=resources.memory_mb,
            capabilities=self.capabilities,
            workers=size,
            queue_depth=in_flight,
            load=round(in_flight / max(1, size), 2),
            max_message_bytes=self.policy.limits.max_message_bytes,
            started_at=self.started_at,
            frames_dropped=self.streams.total_dropped,
        )

    @property
    def _served(self) -> BrokerAddress:
        """Where devices connect: the device (TLS) listener when there is one."""
        return self.pairing.lan if self.pairing is not None else self.listen

    def _advertised(self) -> list[str]:
        """Where devices are told to connect: with a device listener, only addresses its
        certificate names (a device checks them), or the configured mDNS interface's."""
        named = self.pairing.named_ips() if self.pairing is not None else None
        return advertised_addresses(self._served, self.config.mdns_interface or None, named)

    def listeners(self) -> dict[str, str]:
        """Every listener, by what it is for (status and the ready line show them all)."""
        found = {"loopback" if self.broker is not None else "broker": str(self.listen)}
        if self.pairing is not None:
            shown = ",".join(self._advertised())
            found["lan-tls"] = f"{self.pairing.lan} (advertised {shown})"
            found["pairing"] = str(self.pairing.pairing)
        return found

    def _txt(self) -> dict[str, str]:
        status = self._status("online")
        pairing = self.pairing
        return {
            "txtvers": "1",
            "pv": "1",
            "id": self.gateway_id,
            "ver": __version__,
            "host": self._advertised()[0],
            "port": str(self._served.port),
            "tls": "1" if pairing is not None else "0",
            "pport": str(pairing.pairing.port) if pairing is not None else "",
            "ca": pairing.ca_fingerprint if pairing is not None else "",
            "runners": ",".join(status.runners),
            "acc": ",".join(accelerator_names(self.providers)),
            "load": f"{status.load:.2f}",
            # Full: every upload, job and task install is refused (storage_full) for now.
            "storage": "full" if self.storage.state().full else "ok",
            # Names only: a TXT string holds 255 bytes; versions are in the retained status.
            "caps": ",".join(
                f"{name}@{version.split(' ', 1)[0]}"
                for name, version in status.capabilities.items()
            ),
        }

    def _save_at_exit(self, what: str, save: Callable[[], object]) -> None:
        """A write at shutdown that a full disk refuses: said once, and the shutdown goes on
        (what the journal already holds is re-run or restored on the next start)."""
        try:
            save()
        except Exception as exc:
            if not is_storage_full(exc):
                raise
            self.storage.hit(exc)
            log.warning("the disk is full: %s not saved at shutdown", what)

    def _open_state(self) -> tuple[StorageGuard, Store, BlobStore]:
        """The state directory's free-space guard, journal and blob store (one sealing key)."""
        limits = self.policy.limits
        storage = StorageGuard(
            self.state_dir,
            reserve_percent=limits.storage_reserve_percent,
            reserve_bytes=limits.storage_reserve_bytes,
        )
        sealer = Sealer.for_state_dir(self.state_dir)
        store = Store(self.state_dir / "hearth.sqlite3", sealer, limits)
        blobs = BlobStore(self.state_dir / "blobs", store, limits, storage=storage, sealer=sealer)
        return storage, store, blobs

    def _worker_settings(self, workers: int) -> WorkerSettings:
        """What each worker is started with: runners, limits and the cores it may use."""
        config = self.config
        # onnxruntime threads: share the cores between the workers instead of each grabbing all.
        onnx_threads = max(1, (os.cpu_count() or 1) // workers)
        return WorkerSettings(
            runners=list(config.runners),
            cache_dir=str(self.state_dir / "cache"),
            wasm_limits=self.policy.wasm.limits(),
            task_limits=WasmLimits(
                fuel=self.policy.tasks.fuel_per_event,
                memory_bytes=self.policy.tasks.memory_bytes,
                output_bytes=0,
            ),
            task_max_actions=self.policy.tasks.max_actions_per_event,
            task_max_payload=self.policy.tasks.max_payload_bytes,
            onnx_threads=onnx_threads,
            providers=self.providers,
            max_megapixels=self.policy.vision.max_megapixels,
            max_streams=self.policy.vision.max_streams,
            gateway_id=self.gateway_id,
            checkpoint_every_s=self.policy.migration.checkpoint_every_s,
            checkpoint_every_mib=self.policy.migration.checkpoint_every_mib,
            precopy_over_mib=self.policy.migration.precopy_over_mib,
            max_chunk_bytes=self.policy.limits.max_chunk_bytes,
        )

    def start(self) -> None:
        if not self.config.broker:
            self.broker = ManagedBroker(
                self.state_dir,
                self.listen,
                self.policy.limits.max_message_bytes + 64 * 1024,
                self._broker_security(),
                timestamps=not journal_stream(),
            )
            self.broker.start()
            for topic_filter in BrokerEvents.filters:
                self.link.subscribe(topic_filter, True)
        self._start_workers()
        self.link.start(encode(self._status("online")))
        if self.upstream is not None:
            self.upstream.start()  # connects in the background
        if self.peers is not None:
            self.peers.start()
        if self.tasks is not None:
            began = time.perf_counter()
            restored = self.tasks.start()
            if self.pairing is not None:  # revoked while the daemon was down: still suspended
                self.tasks.owners_revoked(self.pairing.locked)
            log.info(
                "restored %d persistent tasks in %.3f s", restored, time.perf_counter() - began
            )
        if self.home_link is not None:  # after the tasks: their subscriptions go with it
            if self.ha is not None:
                self.ha.start()
                self.loop.every(1.0, self.ha.refresh)
            self.home_link.start()  # in the background
        self.control = ControlServer(
            self.loop,
            self.state_dir / "control.sock",
            self.blobs,
            self.dispatcher.task_request,
            admin=self.pairing.admin if self.pairing is not None else None,
        )
        self._start_web()
        resumed = self.dispatcher.resume()
        if resumed:
            log.info("resumed %d journaled jobs from the last run", resumed)
        if self.config.mdns:
            self._advertise()
        self.loop.every(
            min(_HOUSEKEEPING_S, self._watchdog_s or _HOUSEKEEPING_S), self._housekeeping
        )
        self._write_snapshot("online")
        _systemd.notify("READY=1", f"STATUS=serving as {self.gateway_id} on {self.listen}")
        log.info(
            "gateway %s ready: broker %s, %d workers, runners %s, providers %s; listeners %s; "
            "mDNS %s; %d paired devices",
            self.gateway_id,
            self.listen,
            self.pool.size,
            ",".join(self.config.runners),
            ",".join(self.providers) or "-",
            ", ".join(f"{kind} {where}" for kind, where in self.listeners().items()),
            repr(self.advertiser.instance_name) if self.advertiser is not None else "off",
            len(self.pairing.active) if self.pairing is not None else 0,
        )

    def _start_workers(self) -> None:
        """Start the worker pool and take what the first worker reports of this box."""
        info = self.pool.start()
        if "providers" in info and isinstance(info["providers"], list):
            self.providers = [str(p) for p in info["providers"]]
        self.worker_network = str(info.get("network", "shared"))
        caps = info.get("capabilities")
        if isinstance(caps, list):
            self.capabilities = dict(str(c).split("=", 1) for c in caps if "=" in str(c))
        if self.worker_network != "isolated":
            log.warning("workers share the host's network: %s", self.worker_network)

    def _advertise(self) -> None:
        self.advertiser = Advertiser(
            self.gateway_id,
            self._served,
            self._txt(),
            self.config.mdns_interface or None,
            name=self.config.mdns_name or default_instance_name(),
            addresses=self._advertised(),
        )
        if not self.advertiser.start():  # every name taken: serve on, unadvertised
            self.advertiser.close()
            self.advertiser = None

    def _start_web(self) -> None:
        """The owner's page and /metrics. A port already taken is not worth stopping the
        gateway for (devices do not need the page): said once, and served without it."""
        self._observe()
        if self.web is None:
            return
        try:
            self.web.start()
        except OSError as exc:
            log.warning("the owner's page is off: %s: %s", self.config.web_listen, exc)
            self.web = None
            return
        log.info("the owner's page: %s (hearth-gateway web-token)", self.web.url)

    def _housekeeping(self) -> None:
        status = encode(self._status("online"))
        if status != self._last_status and self.link.connected:
            self.link.publish_status(status)
            self._last_status = status
        if self.advertiser is not None:
            self.advertiser.update(self._txt())
        self.storage.refresh()  # space coming back is noticed without a request
        self.blobs.expire_uploads()
        self.dispatcher.expire_sessions()
        if self.peers is not None:
            self.peers.refresh()  # paired or revoked with `hearth-gateway peers` meanwhile
        if time.monotonic() - self._last_gc > 600:
            self._last_gc = time.monotonic()
            self.store.expire()
        try:
            self._write_snapshot("online")
            self._observe()
        except Exception as exc:  # the status must not stop the watchdog below
            if not self._storage_error(exc):
                raise
        if self.broker is not None and self.broker.failed.is_set():
            log.error("the managed broker keeps dying; stopping")
            self._stopping = True
            return
        # Only a loop that gets here pets the watchdog: a wedged daemon gets restarted.
        _systemd.notify("WATCHDOG=1")

    def _write_snapshot(self, state: str) -> None:
        count, size = self.store.blob_totals()
        storage = self.storage.state()
        counters = self.dispatcher.counters
        peer_views = self.peers.views() if self.peers is not None else []
        write_snapshot(
            self.state_dir,
            StatusSnapshot(
                gateway_id=self.gateway_id,
                state=state,
                pid=os.getpid(),
                version=__version__,
                broker=str(self.listen),
                managed_broker=self.broker is not None,
                broker_pid=self.broker.pid if self.broker else None,
                mdns=self.advertiser is not None,
                mdns_name=self.advertiser.instance_name if self.advertiser is not None else "",
                listeners=self.listeners(),
                paired_devices=len(self.pairing.active) if self.pairing is not None else 0,
                runners=list(self.config.runners),
                providers=self.providers,
                models=self.choices.choices() if self.choices is not None else {},
                workers=self.pool.size,
                worker_pids=self.pool.pids(),
                worker_restarts=self.pool.restarts,
                workers_recycled=self.pool.recycled,
                worker_rss_bytes=self.pool.resident(),
                worker_network=self.worker_network,
                busy_workers=self.pool.busy,
                queue_depth=self.admission.in_flight,
                jobs_accepted=counters.accepted,
                jobs_completed=counters.completed,
                jobs_refused=counters.refused,
                jobs_duplicate=counters.duplicates,
                blobs=count,
                blob_bytes=size,
                journal=self.store.stats(),
                tasks=self.tasks.count if self.tasks is not None else 0,
                capabilities=self.capabilities,
                streams=len(self.streams),
                frames_dropped=self.streams.total_dropped,
                sessions=len(self.dispatcher.sessions),
                tier=self.config.tier,
                upstream=str(self.upstream.link.target) if self.upstream is not None else "",
                upstream_connected=self.upstream is not None and self.upstream.link.ready,
                jobs_forwarded=counters.forwarded,
                jobs_fell_back=self.upstream.fell_back if self.upstream is not None else 0,
                storage_full=storage.full,
                storage_free_bytes=storage.free_bytes,
                storage_total_bytes=storage.total_bytes,
                storage_reserve_bytes=storage.reserve_bytes,
                storage_refused=storage.refused,
                broker_dropped=self.broker_events.dropped,
                home_broker=str(self.home_link.target) if self.home_link is not None else "",
                peers={v.gateway_id: "ready" if v.ready else "connecting" for v in peer_views},
                peer_jobs_in_flight=sum(v.in_flight for v in peer_views),
                home_broker_state=self.home_link.state if self.home_link is not None else "",
                started_at=self.started_at,
                updated_at=time.time(),
            ),
        )

    def run_forever(self) -> int:
        """Start, serve until SIGTERM/SIGINT, close. Returns the exit status."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            self._stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.loop.wake_on_signals()
        try:
            self.start()
            # What start-up made (modules, policies, the metrics registry: hundreds of thousands
            # of objects) lives as long as the daemon: out of the collector's sight, a full
            # collection does not walk it again every few thousand jobs (milliseconds each).
            gc.freeze()
            self.loop.run_until(lambda: self._stopping)
        finally:
            self.close()
        failed = self.broker is not None and self.broker.failed.is_set()
        return 1 if failed else 0

    def stop(self) -> None:
        self._stopping = True

    def close(self, drain_timeout_s: float = 20.0) -> None:
        """Stop serving. Idempotent. Queued and running jobs get ``drain_timeout_s`` to finish
        and be answered; what is still queued after that stays journaled for the next start."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        _systemd.notify("STOPPING=1")
        if self.advertiser is not None:
            self.advertiser.close()
        self.dispatcher.draining = True
        # Migratable runs do not hold the shutdown up: they go back to their devices now.
        moving = self.dispatcher.runs.move_all(REASON_STOPPING)
        if moving:
            log.info("sending %d migratable run(s) back to their devices", moving)
        upstream = self.upstream
        drained = self.loop.run_until(
            lambda: (
                self.pool.idle
                and (upstream is None or upstream.idle)
                and (self.peers is None or self.peers.idle)
            ),
            drain_timeout_s,
        )
        if not drained:
            log.warning(
                "jobs still running after %.0f s; they will be re-run on the next start",
                drain_timeout_s,
            )
        if self.tasks is not None:
            self._save_at_exit("the tasks' last checkpoints", self.tasks.close)
        if self.web is not None:
            self.web.close()  # before the control socket it calls
        if self.control is not None:
            self.control.close()
        if self.upstream is not None:
            self.upstream.close()
        if self.peers is not None:
            self.peers.close()
        # Rows still held (jobs that did not finish) are written now; closing the link runs the
        # loop, which acknowledges what they cover.
        self.dispatcher.flush()
        self._save_at_exit("jobs still running", lambda: self.store.flush(everything=True))
        self.pool.close()
        if self.home_link is not None:
            self.home_link.close()  # availability -> offline
        self.link.close()  # retained status -> offline
        if self.broker is not None:
            self.broker.close()
        try:
            self._write_snapshot("stopped")
        except Exception:
            log.exception("could not write the final status snapshot")
        self.store.close()
        self.loop.close()
        log.info("gateway %s stopped", self.gateway_id)
