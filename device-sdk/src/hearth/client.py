"""The device-side client: offload to a gateway, or run locally, per call.

Concurrency: a call sends its job and gets a ``Future`` that paho's network thread completes
when the reply arrives (``hearth._connection``). A blocking call waits on it; an ``*_async``
call returns a Future chained on it, so a call in flight holds no thread. Only work that runs
on this device, placed here or fallen back to, takes a thread: one of a small named pool for
async calls, the caller's own for blocking ones. ``close()`` is idempotent and waits for the
async calls under way.

Built from (``hearth._*``): ``_gateway`` (which gateway, its connection, the LAN rule),
``_offload`` (retries, uploads), ``_local`` (the runtimes here); vision and task calls come
from ``hearth.vision`` and ``hearth._tasks``.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import msgspec

from hearth._blobs import Blob
from hearth._futures import chain, race, running, then
from hearth._hedge import Hedger
from hearth._job_ids import JobIds
from hearth._local import LocalRuntimes, local_runtimes_installed
from hearth._needs import choose, send_first
from hearth._results import Inference, WasmRun
from hearth._tasks import TaskCalls
from hearth.discovery import GatewayInfo, discover
from hearth.errors import ErrorCode, GatewayUnavailable, JobError, QuotaExceeded
from hearth.migration import LinkPolicy, MigratableRun, load_module
from hearth.placement import Decision, Estimates, Placement, decide
from hearth.protocol import (
    DataClass,
    Describe,
    Described,
    GatewayStatus,
    OnnxJob,
    OnnxResult,
    Reply,
    Requirements,
    WasmJob,
    WasmResult,
)
from hearth.requirements import app_name, requirements
from hearth.runtime.limits import WasmLimits
from hearth.vision import VisionCalls

__all__ = ["Client", "Inference", "WasmRun"]

T = TypeVar("T", WasmRun, Inference)

# Seconds an ``auto`` call whose gateway went away waits for it before it runs here: a managed
# broker restarts in about 0.5 s, and the link reconnects within 2 s of a loss.
FALLBACK_PATIENCE_S = 4.0
_REDISCOVER_S = 60.0  # how long the gateways found for a call's requirements are reused
R = TypeVar("R", WasmResult, OnnxResult)


class Needs(NamedTuple):
    """A call's own ``requires`` and ``local`` (None: the client's)."""

    requires: Requirements | Mapping[str, Any] | None
    local: bool | None


@functools.cache
def _local_providers() -> tuple[str, ...]:
    """This device's onnxruntime providers (what a local ONNX run may use)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return ()
    return tuple(ort.get_available_providers())


@dataclass(frozen=True)
class _Plan:
    """Where one call goes, decided before anything is sent."""

    where: str  # "edge" | "local"
    reason: str
    fallback_ok: bool = False  # an edge call may still run here if the gateway fails it
    estimates: Estimates | None = None  # None: the call is not timed (not a placement choice)
    # A hedge whose loser is cancelled (hearth._hedge): both halves, started; None: hedge the
    # plain way (edge and local, the slower one's answer dropped).
    hedged: Callable[[], Future[Any]] | None = None

    @property
    def patience_s(self) -> float | None:
        """How long a call cut off from its gateway waits for it to come back: one that may
        run here waits a broker restart's worth; one that may not, until its deadline."""
        return FALLBACK_PATIENCE_S if self.fallback_ok else None


class Client(VisionCalls, TaskCalls):
    """Offload WebAssembly and ONNX jobs to a Hearth gateway, or run them here; call its vision
    capabilities (hearth.vision) and manage persistent tasks on it.

    >>> with Client(placement="auto") as hearth:          # doctest: +SKIP
    ...     run = hearth.run_wasm("filter.wasm", stdin=frame, args=["edges"])
    ...     print(run.where, run.reason, run.latency_ms)

    ``gateway``: a GatewayInfo from ``discover()``, "HOST:PORT", or None to use
    $HEARTH_GATEWAY or else mDNS discovery (on $HEARTH_INTERFACE / ``interface`` if set).
    ``max_workers``: how many async calls may run on this device at once.
    ``app``: the application the calls are for (its quotas on the gateway, docs/quotas.md;
    default: this device's id). ``requires``: what every call needs of wherever it runs
    (``{"accelerator": "gpu", "memory_mb": 512, "capability": "vision.plate",
    "max_latency_ms": 50}``; a call may state its own). ``local=False``: never run on this
    device; calls wait for a gateway that qualifies up to their deadline, then fail
    ``unsatisfiable``. ``gateways``: other gateways ("HOST:PORT") for calls whose requirements
    the first does not meet.
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
        app: str | None = None,
        requires: Requirements | Mapping[str, Any] | None = None,
        local: bool = True,
        gateways: Sequence[GatewayInfo | str] = (),
    ) -> None:
        super().__init__(
            gateway,
            client_id=client_id,
            interface=interface,
            timeout_s=timeout_s,
            retries=retries,
            discover_timeout_s=discover_timeout_s,
            qos=qos,
        )
        self.placement = Placement(placement)
        self._client_id_arg = client_id  # for peers: the id this client was asked to use
        self.app = app_name(app)
        self._offload.uploads.app = self._wire_app()
        # Every call's requirements unless it states its own (validated now: a bad one fails
        # here, not at the first call); local=False: calls are never run on this device.
        self.requires = requirements(requires)
        self.local = local
        # Other gateways for calls whose requirements the first one does not meet.
        self._gateways = list(gateways)
        self._discovered: tuple[float, list[GatewayInfo]] = (-1e9, [])  # (when, what)
        # Gateways that refused this device's jobs for a daily quota: skipped until it resets.
        self._quota_until: dict[str, tuple[float, str]] = {}
        self._estimates: dict[str, Estimates] = {}
        self._lock = threading.Lock()  # the estimates and the async calls in flight
        self._local = LocalRuntimes(self.stats, max_workers)
        self._in_flight: set[Future[Any]] = set()  # async calls, for close() to wait on
        self._runs: set[MigratableRun] = set()  # migratable runs still going
        self._hedger = Hedger(self, self.stats, self._track)
        # False: a hedge's loser runs to its end and its answer is dropped (the cheaper path
        # for a module that has no migration point to stop at: hearth._hedge).
        self.hedge_cancels = True
        self._peers: dict[str, Client] = {}  # gateways runs were sent on to, by address
        self._job_ids = JobIds()  # ids the caller chose: one id, one job, on either side

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            in_flight = list(self._in_flight)
            runs = list(self._runs)
        for run in runs:
            run.close()
        wait(in_flight)
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            peer.close()
        self._local.close()
        known = self._link.known
        if known is not None and known.estimates:
            with self._lock:
                known.save()  # the placement measurements, for the next process
        super().close()

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
        requires: Requirements | Mapping[str, Any] | None = None,
        local: bool | None = None,
    ) -> WasmRun:
        """Run a WASI command module: args and stdin in; stdout, stderr, exit code out.

        ``data_class``: "private" (the default) work is only ever offloaded to a gateway on the
        LAN. ``requires``, ``local``: as the Client's, for this call. Raises JobError when the
        module fails (trap, limits...), wherever it ran; RequirementsError (a ValueError) for
        a bad ``requires``, before anything is sent."""
        return self._call(
            *self._wasm(
                module,
                stdin,
                args,
                where=where,
                job_id=job_id,
                data_class=data_class,
                needs=Needs(requires, local),
            )
        )

    def run_wasm_async(
        self,
        module: bytes | str | Path,
        stdin: bytes = b"",
        args: Sequence[str] = (),
        *,
        where: Placement | str | None = None,
        job_id: str | None = None,
        data_class: DataClass = "private",
        requires: Requirements | Mapping[str, Any] | None = None,
        local: bool | None = None,
    ) -> Future[WasmRun]:
        """Like run_wasm, without blocking: returns a concurrent.futures.Future, completed on
        paho's thread (an edge run) or the local pool's (a run here). A call that must wait
        for a gateway that meets its requirements (``local=False``) waits here first."""
        return self._call_async(
            lambda: self._wasm(
                module,
                stdin,
                args,
                where=where,
                job_id=job_id,
                data_class=data_class,
                needs=Needs(requires, local),
            )
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
        requires: Requirements | Mapping[str, Any] | None = None,
        local: bool | None = None,
    ) -> Inference:
        """Run an ONNX model on named numpy arrays; returns named numpy arrays. ``requires``,
        ``local``: as for run_wasm."""
        return self._call(
            *self._onnx(
                model,
                inputs,
                outputs,
                where=where,
                job_id=job_id,
                data_class=data_class,
                needs=Needs(requires, local),
            )
        )

    def infer_async(
        self,
        model: bytes | str | Path,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] = (),
        *,
        where: Placement | str | None = None,
        job_id: str | None = None,
        data_class: DataClass = "private",
        requires: Requirements | Mapping[str, Any] | None = None,
        local: bool | None = None,
    ) -> Future[Inference]:
        """Like infer, without blocking: returns a concurrent.futures.Future."""
        return self._call_async(
            lambda: self._onnx(
                model,
                inputs,
                outputs,
                where=where,
                job_id=job_id,
                data_class=data_class,
                needs=Needs(requires, local),
            )
        )

    def describe(self, blob: bytes | str | Path) -> Described:
        """What a model or module offers, as the gateway reads it: an ONNX model's inputs and
        outputs (names, dtypes, shapes), a WebAssembly module's imports and exports
        (``Described.kind`` says which). The gateway is asked (the device may have no
        runtimes), and the file is uploaded first if it lacks it. Raises JobError
        (``invalid_model``, ``invalid_module``...) or GatewayUnavailable."""
        data = self._blob(blob)
        # What a file holds is private until labelled otherwise: only a LAN gateway sees it
        # (connected first, so that a cloud tier at a LAN address is known for one).
        self.gateway_reachable()
        if (why := self.private_refusal(True)) is not None:
            raise JobError(ErrorCode.POLICY_DENIED, why)
        request = Describe(job_id=uuid.uuid4().hex, blob=data.sha256)
        reply = self._offload.submit(None, request, data).outcome.result()
        if not isinstance(reply, Described):
            raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")
        return reply

    # -- migratable runs (hearth.migration, docs/migration.md) ------------------------------

    def start_wasm(
        self,
        module: bytes | str | Path,
        stdin: bytes = b"",
        args: Sequence[str] = (),
        *,
        migratable: bool = True,
        where: str | None = None,
        data_class: DataClass = "private",
        checkpoint_every_s: float = 0.0,
        checkpoint_every_mib: float = 0.0,
        deadline_s: float = 600.0,
        link: LinkPolicy | None = None,
        run_id: str | None = None,
        limits: WasmLimits | None = None,
    ) -> MigratableRun:
        """Start a WASI command module as a migratable run and return its handle at once:
        ``run.where``, ``run.migrate(to=...)``, ``run.snapshot()``, ``run.result()``.

        The module is instrumented here if it is not already (Binaryen's wasm-opt, see
        docs/migration.md). ``where``: "local" or "edge"; None: the gateway when one is
        reachable and may take the run's data, else this device. ``checkpoint_every_s``: how
        often a gateway sends the run's state back here, ``checkpoint_every_mib``: after how
        much of the run's I/O (MiB read and written), whichever first (0: its policy);
        ``deadline_s``: how long one hop on a gateway may go without an answer before the run
        comes back; ``link``: when a degraded link to the gateway brings it back (LinkPolicy).
        ``limits``: fuel, memory and output for its hops on this device (the run's fuel counts
        across hops; a gateway applies its own policy's)."""
        if not migratable:
            raise ValueError("start_wasm makes migratable runs; run_wasm runs the others")
        data = load_module(module)
        place, reason = self._run_place(where, data_class)
        run = MigratableRun(
            self,
            data,
            args=args,
            stdin=stdin,
            data_class=data_class,
            where=place,
            reason=reason,
            checkpoint_every_s=checkpoint_every_s,
            checkpoint_every_mib=checkpoint_every_mib,
            deadline_s=deadline_s,
            link=link,
            run_id=run_id,
            limits=limits,
        )
        self._track(run)
        return run

    def resume(
        self,
        snapshot: bytes | str | Path,
        module: bytes | str | Path,
        *,
        where: str | None = None,
        checkpoint_every_s: float = 0.0,
        checkpoint_every_mib: float = 0.0,
        deadline_s: float = 600.0,
        link: LinkPolicy | None = None,
        limits: WasmLimits | None = None,
    ) -> MigratableRun:
        """Continue a run from a snapshot file (``run.snapshot()``, a checkpoint) with its
        module (instrumented, or the plain one, instrumented here again with the same
        Binaryen), here or on the gateway."""
        from hearth.runtime.snapshot import decode_snapshot

        data = snapshot if isinstance(snapshot, bytes) else Path(snapshot).read_bytes()
        # The plain module is instrumented as start_wasm did: same wasm-opt, same bytes.
        module_bytes = load_module(module)
        state = decode_snapshot(data, module=self._blob(module_bytes).sha256)
        place, reason = self._run_place(where, state.data_class)
        run = MigratableRun(
            self,
            module_bytes,
            args=(),
            stdin=b"",
            data_class=state.data_class,
            where=place,
            reason=f"resumed from a snapshot ({reason})",
            checkpoint_every_s=checkpoint_every_s,
            checkpoint_every_mib=checkpoint_every_mib,
            deadline_s=deadline_s,
            link=link,
            run_id=state.run_id,
            snapshot=data,
            limits=limits,
        )
        self._track(run)
        return run

    def _run_place(
        self, where: str | None, data_class: DataClass
    ) -> tuple[Literal["local", "edge"], str]:
        if where == "local" or (where is None and self.placement is Placement.LOCAL):
            return "local", "placement=local"
        # Connected first: whether the gateway may take private work depends on its tier.
        reachable = self.gateway_reachable()
        why = self._off_lan(data_class == "private", Placement.EDGE)
        if where == "edge":
            if why is not None:
                raise JobError(ErrorCode.FORBIDDEN, why)
            if not reachable:
                raise GatewayUnavailable(self._link.last_failure or "no gateway reachable")
            return "edge", "placement=edge"
        if why is None and reachable:
            return "edge", "a gateway is reachable"
        return "local", why or "no gateway reachable"

    def _track(self, run: MigratableRun) -> None:
        with self._lock:
            self._runs = {r for r in self._runs if not r.done()}
            self._runs.add(run)

    def migratable_runtime(self) -> Any:
        """This device's runtime for migratable runs (shared by all of them)."""
        return self._local.migratable_runtime()

    def peer(self, address: str | GatewayInfo) -> Client:
        """A client for the gateway at ``address`` ("HOST:PORT", or as discovered), where a
        saturated gateway sent one of this client's runs (``run_moved`` ``to``) or a call's
        requirements send it; made once, closed with this one. Its own LAN rule holds: a
        private run is not sent to it off the LAN."""
        key = str(address.broker) if isinstance(address, GatewayInfo) else address
        with self._lock:
            peer = self._peers.get(key)
            if peer is None:
                # The same device and application there (a paired gateway may rename it).
                peer = Client(
                    address,
                    client_id=self._client_id_arg,
                    placement="edge",
                    timeout_s=self.timeout_s,
                    app=self.app,
                )
                self._peers[key] = peer
            return peer

    def private_refusal(self, private: bool) -> str | None:
        """Why private work may not go to the connected gateway (off the LAN, a cloud tier)."""
        return self._off_lan(private, Placement.EDGE)

    def upload_blob(self, conn: Any, data: bytes, max_chunk: int, data_class: DataClass) -> None:
        """Upload ``data`` as a blob (content-addressed) and wait until the gateway has it."""
        blob = self._blob(data)
        done = self._offload.uploads.ensure(conn, blob, max_chunk, data_class, time.monotonic())
        done.result()

    # -- the two kinds of job -----------------------------------------------------------------

    def _wasm(
        self,
        module: bytes | str | Path,
        stdin: bytes,
        args: Sequence[str],
        *,
        where: Placement | str | None,
        job_id: str | None,
        data_class: DataClass,
        needs: Needs,
    ) -> tuple[_Plan, Callable[[], Future[WasmRun]], Callable[[str], WasmRun]]:
        """(where it goes, how to send it, how to run it here)."""
        blob = self._blob(module)
        required = requirements(needs.requires) if needs.requires is not None else self.requires
        job = WasmJob(
            job_id=job_id or uuid.uuid4().hex,
            module=blob.sha256,
            args=list(args),
            stdin=stdin,
            data_class=data_class,
            requires=required or msgspec.UNSET,
            app=self.app or msgspec.UNSET,
        )
        key, private = f"wasm:{blob.sha256}", data_class == "private"
        local_ok = self.local if needs.local is None else needs.local
        if required is not None or not local_ok:
            plan, targets = self._needs_plan(key, where, private, required, local_ok)
            if job_id is not None:
                self._job_ids.check(job_id, job, plan.where)
            return (
                plan,
                lambda: send_first(
                    targets, lambda c: c._send(job, blob, WasmResult, _wasm_run, plan.patience_s)
                ),
                lambda reason: self._local.run_wasm(job, blob, reason),
            )
        plan = self._plan(key, where, private=private)
        if job_id is not None:
            self._job_ids.check(job_id, job, plan.where)
        hedge = plan.where == "hedge" and self.hedge_cancels
        if hedge and (migratable := self._hedger.migratable(blob.data)):
            plan = dataclasses.replace(plan, hedged=lambda: self._hedger.start(job, migratable))
        return (
            plan,
            lambda: self._send(job, blob, WasmResult, _wasm_run, plan.patience_s),
            lambda reason: self._local.run_wasm(job, blob, reason),
        )

    def _onnx(
        self,
        model: bytes | str | Path,
        inputs: Mapping[str, Any],
        outputs: Sequence[str],
        *,
        where: Placement | str | None,
        job_id: str | None,
        data_class: DataClass,
        needs: Needs,
    ) -> tuple[_Plan, Callable[[], Future[Inference]], Callable[[str], Inference]]:
        from hearth.runtime.onnx import array_to_tensor

        blob = self._blob(model)
        required = requirements(needs.requires) if needs.requires is not None else self.requires
        job = OnnxJob(
            job_id=job_id or uuid.uuid4().hex,
            model=blob.sha256,
            inputs=[array_to_tensor(name, value) for name, value in inputs.items()],
            outputs=list(outputs),
            data_class=data_class,
            requires=required or msgspec.UNSET,
            app=self.app or msgspec.UNSET,
        )
        key, private = f"onnx:{blob.sha256}", data_class == "private"
        local_ok = self.local if needs.local is None else needs.local
        if required is not None or not local_ok:
            plan, targets = self._needs_plan(key, where, private, required, local_ok)
            if job_id is not None:
                self._job_ids.check(job_id, job, plan.where)
            return (
                plan,
                lambda: send_first(
                    targets, lambda c: c._send(job, blob, OnnxResult, _inference, plan.patience_s)
                ),
                lambda reason: self._local.run_onnx(job, blob, reason),
            )
        plan = self._plan(key, where, private=private)
        if job_id is not None:
            self._job_ids.check(job_id, job, plan.where)
        return (
            plan,
            lambda: self._send(job, blob, OnnxResult, _inference, plan.patience_s),
            lambda reason: self._local.run_onnx(job, blob, reason),
        )

    def _send(
        self,
        job: WasmJob | OnnxJob,
        blob: Blob,
        expected: type[R],
        result: Callable[[R, WasmJob | OnnxJob, float, str | None], T],
        patience_s: float | None,
    ) -> Future[T]:
        """Offload ``job``: its result, completed when the gateway's answer arrives. A gateway
        that goes away (or is away when the call starts) is waited for until the call's
        deadline, or ``patience_s`` when the call may run here instead."""
        started = time.perf_counter()
        sent = self._offload.submit(None, job, blob, patience_s=patience_s)

        def answered(reply: Reply) -> T:
            ms = (time.perf_counter() - started) * 1e3
            if not isinstance(reply, expected):
                raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")
            return result(reply, job, ms, sent.gateway_id)

        return then(sent.outcome, answered)

    # -- placement ----------------------------------------------------------------------------

    def gateway_status(self) -> GatewayStatus | None:
        """The connected gateway's last status (what it offers), if connected."""
        conn = self._link.current
        return conn.status if conn is not None else None

    def why_unreachable(self) -> str:
        return self._link.why_unusable()

    def _places(self) -> list[Client]:
        """The gateways a call with requirements may go to: this client's, then the others."""
        others = self._gateways or self._discover_others()
        return [self, *(self.peer(address) for address in others)]

    def _discover_others(self) -> list[GatewayInfo]:
        """Without ``gateways=``, a client that found its gateway over mDNS considers the
        others found with it (looked for again at most once a minute)."""
        if self._link.named is not None:
            return []
        with self._lock:
            at, found = self._discovered
        if time.monotonic() - at > _REDISCOVER_S:
            found = discover(self._link.discover_timeout_s, interface=self._link.interface)
            with self._lock:
                self._discovered = (time.monotonic(), found)
        conn = self._link.current
        mine = conn.gateway_id if conn is not None else None
        # Those it may talk to: plain ones, and TLS ones it is paired with (as the link picks).
        return [
            g
            for g in found
            if g.gateway_id != mine and (not g.tls or (g.paired and not g.ca_changed))
        ]

    def _needs_plan(
        self,
        key: str,
        where: Placement | str | None,
        private: bool,
        needs: Requirements | None,
        local_ok: bool,
    ) -> tuple[_Plan, list[Client]]:
        """Where a call with requirements (or one that may not run here) goes: the places
        that qualify (hearth._needs), and why the others were skipped."""
        mode = Placement(where) if where is not None else self.placement
        conn = self._link.current
        primary = self._estimates.get(f"{conn.gateway_id if conn else '-'}:{key}")
        choice = choose(
            self._places(),
            needs,
            mode=mode,
            private=private,
            local=(
                local_ok and self._local_available(),
                _local_providers() if key.startswith("onnx:") else (),
                primary.local_ms if primary is not None else None,
            ),
            estimates=lambda gateway_id: self._estimates.get(f"{gateway_id}:{key}"),
            deadline_s=self._offload.deadline_s,
        )
        skipped = choice.why_skipped()
        if not choice.targets:
            return _Plan("local", f"requires met by this device only{skipped}"), []
        first = choice.targets[0]
        status = first.gateway_status()
        gateway_id = status.gateway_id if status is not None else "-"
        if first is self and choice.local and mode is not Placement.EDGE:
            plan = self._plan(key, where, private=private)  # both qualify: time them as usual
            if plan.where in ("local", "edge"):
                return dataclasses.replace(plan, reason=f"{plan.reason}{skipped}"), [self]
        with self._lock:
            estimates = self._estimates.setdefault(f"{gateway_id}:{key}", Estimates())
        met = "requires met by" if needs is not None else "offload is mandatory (local=False):"
        reason = f"{met} gateway {gateway_id}{skipped}"
        return _Plan("edge", reason, choice.local, estimates), choice.targets

    def _plan(self, key: str, where: Placement | str | None, *, private: bool) -> _Plan:
        mode = Placement(where) if where is not None else self.placement
        # Private data never goes to a gateway off the LAN: checked before connecting to a
        # named gateway, and again once connected to a discovered one.
        why = self._off_lan(private, mode)
        gateway_ok = False
        if why is None:
            gateway_ok = mode is Placement.EDGE or (
                mode in (Placement.AUTO, Placement.HEDGE) and self.gateway_reachable()
            )
            if mode is Placement.EDGE and private:
                # Connected, private work learns the gateway's tier before anything is sent: a
                # cloud tier (a pool, say) at a LAN address never sees the data.
                self.gateway_reachable()
            why = self._off_lan(private, mode)
        if why is not None:
            if mode is Placement.EDGE:
                raise JobError(ErrorCode.FORBIDDEN, why)
            return _Plan("local", why)
        conn = self._link.current
        known = self._link.known
        with self._lock:
            if known is not None and conn is not None and known.gateway_id == conn.gateway_id:
                # A paired gateway: measured by earlier processes too, and kept for later ones
                # (hearth._known; saved when the client closes).
                estimates = known.estimates.setdefault(key, Estimates())
            else:
                # Estimates are per gateway: a different box (after a failover) is measured
                # afresh.
                gw_key = f"{conn.gateway_id if conn else '-'}:{key}"
                estimates = self._estimates.setdefault(gw_key, Estimates())
            estimates.calls += 1
        quota = self._quota_refused(conn.gateway_id if conn else None)
        auto = mode in (Placement.AUTO, Placement.HEDGE)
        if quota is not None and auto and self._local_available():
            return _Plan("local", quota, estimates=estimates)
        decision: Decision = decide(
            mode, gateway=gateway_ok, local=self._local_available(), estimates=estimates
        )
        reason = decision.reason
        needed = self.pairing_needed
        if decision.where == "local" and not gateway_ok and needed is not None:
            reason = f"{reason}: {needed}"  # say what to do about it, not only that it failed
        return _Plan(decision.where, reason, decision.fallback_ok, estimates)

    def _local_available(self) -> bool:
        return local_runtimes_installed()

    def _quota_refused(self, gateway_id: str | None) -> str | None:
        """Why an ``auto`` call skips this gateway: it refused this device's application
        for a daily quota that has not reset yet."""
        if gateway_id is None:
            return None
        with self._lock:
            until, why = self._quota_until.get(gateway_id, (0.0, ""))
        return why if time.time() < until else None

    def _call(self, plan: _Plan, edge: Callable[[], Future[T]], local: Callable[[str], T]) -> T:
        """A blocking call: the async one's steps, waited for on this thread."""
        if plan.where == "local":
            return self._run_here(plan, local)
        if plan.where == "hedge":
            return self._hedged(plan, edge, local).result()
        try:
            result = edge().result()
        except Exception as exc:  # noqa: BLE001 - _fallback re-raises what may not fall back
            return local(self._fallback(plan, exc))
        return self._ran_there(plan, result)

    def _call_async(
        self, prepare: Callable[[], tuple[_Plan, Callable[[], Future[T]], Callable[[str], T]]]
    ) -> Future[T]:
        outcome: Future[T] = running()
        try:
            plan, edge, local = prepare()
        except Exception as exc:  # noqa: BLE001 - reported through the future, as a run's are
            outcome.set_exception(exc)
            return outcome
        with self._lock:
            self._in_flight.add(outcome)
        outcome.add_done_callback(self._settled)
        if plan.where == "local":
            self._run_later(lambda: self._run_here(plan, local), outcome)
            return outcome
        if plan.where == "hedge":
            chain(self._hedged(plan, edge, local), outcome)
            return outcome

        def answered(sent: Future[T]) -> None:
            try:
                result = sent.result()
            except Exception as exc:  # noqa: BLE001 - _fallback re-raises what may not fall back
                try:
                    reason = self._fallback(plan, exc)
                except Exception as final:  # noqa: BLE001 - handed to whoever waits
                    outcome.set_exception(final)
                    return
                self._run_later(lambda: local(reason), outcome)
                return
            outcome.set_result(self._ran_there(plan, result))

        edge().add_done_callback(answered)
        return outcome

    def _hedged(
        self, plan: _Plan, edge: Callable[[], Future[T]], local: Callable[[str], T]
    ) -> Future[T]:
        """Both sides at once; the first answer wins. A WASM call whose module can migrate
        runs as two migratable runs and the loser is cancelled (hearth._hedge); otherwise the
        other is not interrupted (neither wasmtime nor a gateway's worker can stop a plain job
        safely): its answer is dropped. benchmarks/hedge.py reports the CPU both cost."""
        self.stats.hedged += 1
        if plan.hedged is not None:
            return plan.hedged()
        there = edge()
        here = self._local.submit(lambda: local(plan.reason))

        def won(first: tuple[int, T]) -> T:
            index, result = first
            if index == 1:
                self.stats.hedge_local_wins += 1
                return dataclasses.replace(result, reason="hedge: this device answered first")
            self.stats.edge_calls += 1
            return dataclasses.replace(result, reason="hedge: the gateway answered first")

        return then(race(there, here), won)

    def _run_later(self, run: Callable[[], T], outcome: Future[T]) -> None:
        """Run ``run`` (on this device) on the local pool, into ``outcome``."""
        try:
            chain(self._local.submit(run), outcome)
        except RuntimeError as exc:  # the pool is shut down: the client was closed
            outcome.set_exception(exc)

    def _settled(self, outcome: Future[Any]) -> None:
        with self._lock:
            self._in_flight.discard(outcome)

    def _run_here(self, plan: _Plan, local: Callable[[str], T]) -> T:
        if plan.estimates is None:
            return local(plan.reason)
        started = time.perf_counter()
        result = local(plan.reason)
        with self._lock:
            plan.estimates.record("local", (time.perf_counter() - started) * 1e3)
        return result

    def _ran_there(self, plan: _Plan, result: T) -> T:
        if plan.estimates is not None:
            with self._lock:
                plan.estimates.record("edge", result.latency_ms)
        self.stats.edge_calls += 1
        return dataclasses.replace(result, reason=plan.reason)

    def _fallback(self, plan: _Plan, exc: Exception) -> str:
        """Why an edge call that failed with ``exc`` runs here instead (every reason says what
        happened); raises when it may not."""
        if isinstance(exc, TimeoutError):
            why = f"gateway timed out: {exc}" if str(exc) else "gateway timed out"
            if not plan.fallback_ok:
                raise GatewayUnavailable(why) from None
            self.stats.fallbacks += 1
            return f"fallback: {why}"
        if isinstance(exc, GatewayUnavailable):
            if not plan.fallback_ok:
                raise exc
            self.stats.fallbacks += 1
            return f"fallback: {str(exc) or type(exc).__name__}"
        if isinstance(exc, QuotaExceeded) and exc.resets_at is not None and plan.fallback_ok:
            # Not worth asking again before it resets: auto calls run here until then.
            conn = self._link.current
            if conn is not None and conn.gateway_id:
                why = f"gateway {conn.gateway_id} refused: {exc.message}"
                with self._lock:
                    self._quota_until[conn.gateway_id] = (exc.resets_at, why)
        if isinstance(exc, JobError):
            # policy_denied: private work this gateway may not run; this device may.
            # unsatisfiable: the gateways that qualified by their status refused after all.
            local_ok = exc.code.retryable or exc.code in (
                ErrorCode.POLICY_DENIED,
                ErrorCode.UNSATISFIABLE,
            )
            if not (plan.fallback_ok and local_ok):
                raise exc
            self.stats.fallbacks += 1
            said = f": {exc.message}" if exc.message else ""
            return f"fallback: gateway answered {exc.code}{said}"
        raise exc


def _wasm_run(reply: WasmResult, job: WasmJob | OnnxJob, ms: float, gateway: str | None) -> WasmRun:
    return WasmRun(
        exit_code=reply.exit_code,
        stdout=reply.stdout,
        stderr=reply.stderr,
        where="edge",
        reason="",
        latency_ms=ms,
        job_id=job.job_id,
        gateway_id=gateway,
        timing=reply.timing,
    )


def _inference(
    reply: OnnxResult, job: WasmJob | OnnxJob, ms: float, gateway: str | None
) -> Inference:
    from hearth.runtime.onnx import tensor_to_array

    return Inference(
        outputs={t.name: tensor_to_array(t) for t in reply.outputs},
        provider=reply.provider,
        where="edge",
        reason="",
        latency_ms=ms,
        job_id=job.job_id,
        gateway_id=gateway,
        timing=reply.timing,
    )
