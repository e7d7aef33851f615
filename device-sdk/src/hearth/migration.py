"""Migratable runs on the device side: a handle that stays valid while the run moves.

``client.start_wasm(module, migratable=True)`` returns a :class:`MigratableRun`. One thread of
its own (``hearth-run-<id>``) drives the run through its hops: it runs on this device (the
SDK's runtime) or on a gateway (``run_start``/``run_resume``), and between two hops the run is
a snapshot (docs/migration.md). What moves it:

- the application: ``run.migrate(to="edge" | "local" | other_client)``;
- the gateway: ``run_moved`` when it stops (SIGTERM) or is overloaded: the run comes back here;
- the link: while the run is on a gateway its driver pings it (``LinkPolicy``); when the round
  trips grow past the policy's limit, or too many pings go unanswered, the run comes back here;
- a dead gateway (Last Will, lost connection, no answer by the deadline): the run resumes here
  from the last ``run_checkpoint``, or from its start if none came; output already produced is
  part of the snapshot, so nothing is repeated or lost.

Every hop is recorded with its reason; ``run.result()`` returns them with the output.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from hearth.errors import ErrorCode, GatewayUnavailable, HearthError, JobError
from hearth.protocol import (
    Error,
    NeedBlob,
    Reply,
    RunAck,
    RunCheckpoint,
    RunChunk,
    RunControl,
    RunMoved,
    RunResult,
    RunResume,
    RunRound,
    RunStart,
)
from hearth.runtime.limits import WasmLimits

if TYPE_CHECKING:
    from hearth._connection import Connection

__all__ = ["Hop", "LinkPolicy", "LinkWatch", "MigratableRun", "RunOutcome", "SnapshotPieces"]

log = logging.getLogger(__name__)

Target = Literal["local", "edge"]
_NEED_BLOB_ROUNDS = 3
# Flow control (docs/migration.md §8.4): the bytes of a hop's rounds, checkpoints and snapshot
# pieces a gateway may have sent that this device has not yet acknowledged. Two 4 MiB pieces:
# within the managed broker's in-flight bound per client (8 MiB), so it never has to drop.
WINDOW_BYTES = 8 << 20


class RunHost(Protocol):
    """What a run needs of the client that drives it: ``hearth.Client`` is one, and any other
    Client (for another gateway) can be a run's target."""

    timeout_s: float

    def connection(self) -> Connection: ...
    def migratable_runtime(self) -> Any: ...
    def peer(self, address: str) -> RunHost: ...
    def private_refusal(self, private: bool) -> str | None: ...
    def upload_blob(
        self, conn: Any, data: bytes, max_chunk: int, data_class: Literal["private", "public"]
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class LinkPolicy:
    """When a run on a gateway comes back because the link to it degraded (docs/migration.md
    §8.1). While a hop is on a gateway, the device pings it (``ping``/``pong``, one small MQTT
    round trip through the broker) every ``every_s``; over the last ``window`` pings, a median
    round trip above ``max_rtt_ms``, or more than ``max_loss`` of them unanswered within
    ``timeout_s``, is a degraded link, and the run is moved back to this device."""

    every_s: float = 2.0  # 0: the link is not watched
    window: int = 5
    max_rtt_ms: float = 1000.0
    max_loss: float = 0.5
    timeout_s: float = 2.0


class LinkWatch:
    """The verdict over a window of pings (pure: the pings are the driver's)."""

    def __init__(self, policy: LinkPolicy) -> None:
        self._policy = policy
        self._samples: list[float | None] = []  # round trips in ms; None: unanswered

    def add(self, rtt_ms: float | None) -> str | None:
        """Record one ping; the reason the link counts as degraded, once it does."""
        self._samples = [*self._samples, rtt_ms][-self._policy.window :]
        if len(self._samples) < self._policy.window:
            return None
        answered = sorted(s for s in self._samples if s is not None)
        lost = len(self._samples) - len(answered)
        if not answered or lost > self._policy.max_loss * len(self._samples):
            return f"link degraded: {lost} of the last {len(self._samples)} pings unanswered"
        median = answered[len(answered) // 2]
        if median > self._policy.max_rtt_ms:
            return (
                f"link degraded: median round trip {median:.0f} ms over the last "
                f"{len(self._samples)} pings, over {self._policy.max_rtt_ms:.0f} ms"
            )
        return None


@dataclass(frozen=True, slots=True)
class Hop:
    """One place a run ran: ``where`` is "local" or a gateway id; ``reason`` why it went
    there."""

    where: str
    reason: str
    # How the run got here when a pre-copy brought it (docs/migration.md §8.4): the rounds and
    # their bytes, and the downtime (stopped at the source to running here, one clock);
    # filled in when this hop ends.
    precopy_rounds: int = 0
    precopy_bytes: int = 0
    downtime_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class RunOutcome:
    run_id: str
    exit_code: int
    stdout: bytes
    stderr: bytes
    hops: tuple[Hop, ...]
    fuel_used: int = 0

    @property
    def where(self) -> str:
        """Where the run finished."""
        return self.hops[-1].where


class SnapshotPieces:
    """A snapshot arriving as ``run_chunk`` messages (one too large for a message), put back
    together: pieces in order from offset 0, checked against their sha256 (pure)."""

    def __init__(self) -> None:
        self._sha = ""
        self._data = bytearray()
        self._size = 0

    def add(self, chunk: RunChunk) -> None:
        if chunk.offset == 0:
            self._sha, self._data, self._size = chunk.sha256, bytearray(), chunk.size
        if chunk.sha256 != self._sha or chunk.offset != len(self._data):
            self._sha = ""  # out of order, or another snapshot's: this one is lost
            return
        self._data += chunk.data

    def take(self, sha256: str) -> bytes:
        """The snapshot named ``sha256``; b"" when it did not arrive whole."""
        import hashlib

        data, self._data = bytes(self._data), bytearray()
        whole = sha256 == self._sha and len(data) == self._size
        self._sha = ""
        return data if whole and hashlib.sha256(data).hexdigest() == sha256 else b""


@dataclass(slots=True)
class _Moved:
    snapshot: bytes
    reason: str
    to: str = ""  # the gateway placement sent it to (a broker address); "": this device
    delta: Any = None  # a pre-copy's final delta (a Snapshot), against the rounds received


class MigratableRun:
    """A running migratable WASI program. Thread-safe; ``close()`` (or a finished run) ends
    its driver thread."""

    def __init__(
        self,
        client: RunHost,
        module: bytes,
        *,
        args: Sequence[str],
        stdin: bytes,
        data_class: Literal["private", "public"],
        where: Target,
        reason: str,
        checkpoint_every_s: float,
        deadline_s: float,
        checkpoint_every_mib: float = 0.0,
        link: LinkPolicy | None = None,
        run_id: str | None = None,
        snapshot: bytes | None = None,
        limits: WasmLimits | None = None,
    ) -> None:
        import hashlib

        self._client = client
        self.module = module
        self.module_sha256 = hashlib.sha256(module).hexdigest()
        self.run_id = run_id or f"run-{uuid.uuid4().hex[:12]}"
        self.args = list(args)
        self.stdin = stdin
        self.data_class = data_class
        self.checkpoint_every_s = checkpoint_every_s
        self.checkpoint_every_mib = checkpoint_every_mib  # 0: the gateway's policy
        self.link = link or LinkPolicy()
        self.deadline_s = deadline_s
        self.limits = limits  # for its hops on this device; a gateway applies its own policy
        self._lock = threading.Lock()
        self._place: str = where
        self._target: tuple[str, RunHost | None] | None = None  # where a requested move goes
        self._target_reason = ""
        self._asked = 0  # moves asked for (migrate calls), and moves carried out
        self._moved_count = 0
        self._serving = 0  # the moves the hop being set up carries out
        self._current_client: RunHost | None = None  # whose gateway the run is on, if any
        self._moved = threading.Condition(self._lock)
        self._hops: list[Hop] = []
        self._snapshot: bytes | None = snapshot  # the latest: a checkpoint or the last pause
        self._snapshot_seq = -1
        self._local_run: Any = None
        self._edge: tuple[Any, str] | None = None  # (connection, job id) of the current hop
        self._hop_count = 0
        self._pieces = SnapshotPieces()  # a snapshot arriving in run_chunk pieces
        # A pre-copy from a gateway (docs/migration.md §8.4): the instance its rounds fill,
        # and the delta that ends it, resumed on that instance by the next hop here.
        self._incoming: Any = None
        self._delta: Any = None
        self.precopy_rounds = 0  # rounds received, all hops together
        self.precopy_bytes = 0
        self._hop_precopy_bytes = 0  # those of the pre-copy under way
        self.paused_at = 0.0  # the source's time.monotonic() when the last move stopped it
        self.resumed_at = 0.0  # this device's, when it ran again here (downtime, one host)
        self._closed = False
        self._pausing = False  # closed by pause(): a gateway is asked to move it, not end it
        # Called with every snapshot this handle gets (checkpoints, and the final one of a
        # hop that moved or paused), on the thread that got it, newest last: a snapshot older
        # than one already handed on is skipped.
        self.on_snapshot: Callable[[bytes], None] | None = None
        self._snapshot_lock = threading.Lock()  # one on_snapshot call at a time, in order
        self._handed_seq = -1
        self.checkpoints = 0  # snapshots received from gateways and taken here
        self.last_checkpoint_at = 0.0  # time.monotonic() of the latest
        self._future: Future[RunOutcome] = Future()
        self._thread = threading.Thread(
            target=self._drive, args=(where, reason), name=f"hearth-run-{self.run_id}"
        )
        self._thread.start()

    # -- what the application sees -------------------------------------------------------------

    @property
    def where(self) -> str:
        """Where the run is now: "local", a gateway id, or "moving"."""
        with self._lock:
            return self._place

    @property
    def hops(self) -> tuple[Hop, ...]:
        with self._lock:
            return tuple(self._hops)

    def done(self) -> bool:
        return self._future.done()

    def future(self) -> Future[RunOutcome]:
        """The run's outcome as a Future (``result()`` is its blocking form)."""
        return self._future

    def result(self, timeout_s: float | None = None) -> RunOutcome:
        """Wait for the run to finish, wherever it does. Raises JobError for the program's
        own failure (trap, limits), GatewayUnavailable never: a lost gateway is a move."""
        try:
            return self._future.result(timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"run {self.run_id} still running") from None

    def migrate(
        self, to: Target | RunHost = "edge", *, wait_s: float | None = 30.0, reason: str = ""
    ) -> str:
        """Move the run: to this device ("local"), to this client's gateway ("edge"), or to
        the gateway of another Client. Returns where it runs after the move (or where it
        finished, if it finished first)."""
        target: tuple[str, RunHost | None] = (to, None) if isinstance(to, str) else ("edge", to)
        if target[0] not in ("local", "edge"):
            raise ValueError(f"migrate to 'local', 'edge' or a Client, not {to!r}")
        why = reason or f"moved by the application to {target[0]}"
        with self._lock:
            if self._future.done() or self._already_there(target):
                return self._place
            self._asked += 1
            ticket = self._asked
            self._target = (target[0], target[1]) if target[1] else target
            self._target_reason = why
            local_run, edge = self._local_run, self._edge
        if local_run is not None:
            local_run.pause()
        elif edge is not None:
            self._control(edge[0], "migrate")
        deadline = None if wait_s is None else time.monotonic() + wait_s
        with self._moved:
            while self._moved_count < ticket and not self._future.done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"run {self.run_id} did not move within {wait_s} s")
                self._moved.wait(left)
            return self._place

    def _already_there(self, target: tuple[str, RunHost | None]) -> bool:
        if self._target is not None or not self._hops:
            return False  # a move is under way, or the run has not arrived anywhere yet
        if target[0] == "local":
            return self._place == "local"
        return self._place != "local" and (target[1] or self._client) is self._current_client

    def snapshot(self, timeout_s: float = 10.0) -> bytes:
        """A snapshot of the run now (a portable file: ``hearth resume FILE`` continues it
        anywhere). The run goes on."""
        with self._lock:
            seq, local_run, edge = self._snapshot_seq, self._local_run, self._edge
        if local_run is not None:
            local_run.checkpoint()
        elif edge is not None:
            self._control(edge[0], "checkpoint")
        deadline = time.monotonic() + timeout_s
        with self._moved:
            while self._snapshot_seq == seq and not self._future.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._moved.wait(left)
            if self._snapshot is None:
                raise TimeoutError(f"no snapshot of run {self.run_id} yet")
            return self._snapshot

    def pause(self, timeout_s: float | None = 30.0) -> bytes | None:
        """Stop the run at its next migration point, wherever it is, and return its final
        snapshot: ``client.resume`` (``hearth resume FILE``) continues it later, here or on a
        gateway. This handle is then done: ``result()`` raises JobError(cancelled).

        Returns None when there is nothing to continue: the run ended first (``result()``
        says how), or it stopped before anything of it was captured (it would start over)."""
        if not self._future.done():
            self._pausing = self._closed = True
            with self._lock:
                local_run, edge = self._local_run, self._edge
            if local_run is not None:
                local_run.pause()
            elif edge is not None:
                self._control(edge[0], "migrate")
        try:
            exc = self._future.exception(timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"run {self.run_id} did not pause within {timeout_s} s") from None
        if not (isinstance(exc, JobError) and exc.code is ErrorCode.CANCELLED):
            return None
        with self._lock:
            return self._snapshot

    def cancel(self) -> None:
        self._closed = True
        with self._lock:
            local_run, edge = self._local_run, self._edge
        if local_run is not None:
            local_run.pause()
        elif edge is not None:
            self._control(edge[0], "cancel")

    def close(self) -> None:
        """Cancel the run if it is still going, and wait for the driver thread."""
        if not self._future.done():
            self.cancel()
        if self._thread is not threading.current_thread():
            self._thread.join()

    # -- the driver ----------------------------------------------------------------------------

    def _drive(self, where: str, reason: str) -> None:
        try:
            self._future.set_result(self._hop_loop(where, reason))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the result
            self._future.set_exception(exc)
        finally:
            with self._moved:
                self._local_run = self._edge = None
                self._moved.notify_all()

    def _hop_loop(self, where: str, reason: str) -> RunOutcome:
        client: RunHost | None = None
        while True:
            if self._closed:
                raise JobError(ErrorCode.CANCELLED, f"run {self.run_id} cancelled", where=where)
            self._hop_count += 1
            if where == "local":
                outcome = self._run_local(reason)
            else:
                try:
                    self._current_client = client or self._client
                    outcome = self._run_edge(self._current_client, reason)
                except (GatewayUnavailable, TimeoutError) as exc:
                    outcome = _Moved(self._snapshot or b"", f"gateway lost ({exc or 'timeout'})")
                except JobError as exc:
                    if not (exc.code.retryable or exc.code is ErrorCode.POLICY_DENIED):
                        raise
                    outcome = _Moved(self._snapshot or b"", f"gateway answered {exc.code}")
            if isinstance(outcome, RunOutcome):
                return outcome
            with self._lock:
                target, self._target = self._target, None
                self._snapshot = outcome.snapshot or self._snapshot
                served = self._asked
            where, client, reason = self._next_place(outcome, target)
            self._serving = served
            if self._closed:
                raise JobError(ErrorCode.CANCELLED, f"run {self.run_id} cancelled", where=where)

    def _next_place(
        self, outcome: _Moved, target: tuple[str, RunHost | None] | None
    ) -> tuple[str, RunHost | None, str]:
        """Where the run goes after a hop that moved it, with whose gateway and why."""
        if outcome.delta is not None:
            home = (target is None and not outcome.to) or (target or ("",))[0] == "local"
            outcome = self._after_precopy(outcome, home)
        if target is not None:
            return target[0], target[1], self._target_reason
        if outcome.to:
            # A saturated gateway's placement sent it on to its upstream (run_moved `to`).
            return "edge", self._client.peer(outcome.to), outcome.reason
        return "local", None, outcome.reason or "back to the device"

    def _arrived(self, where: str, reason: str) -> None:
        with self._moved:
            self._place = where
            self._hops.append(Hop(where, reason))
            self._moved_count = self._serving  # the moves asked for so far are done
            self._moved.notify_all()

    def _checkpointed(self, snapshot: bytes) -> None:
        with self._moved:
            self._snapshot = snapshot
            self._snapshot_seq += 1
            seq = self._snapshot_seq
            self.checkpoints += 1
            self.last_checkpoint_at = time.monotonic()
            self._moved.notify_all()
        callback = self.on_snapshot
        if callback is not None:
            with self._snapshot_lock:
                if seq > self._handed_seq:
                    self._handed_seq = seq
                    callback(snapshot)

    # -- a hop on this device ------------------------------------------------------------------

    def _run_local(self, reason: str) -> RunOutcome | _Moved:
        from hearth.runtime.migratable import Paused
        from hearth.runtime.snapshot import decode_snapshot, encode_snapshot

        runtime = self._client.migratable_runtime()
        arrival: tuple[int, int] | None = None  # this hop's pre-copy: rounds, bytes
        if self._delta is not None and self._incoming is not None:
            # The end of a pre-copy: the delta goes on in the instance the rounds filled.
            delta, incoming, self._delta, self._incoming = self._delta, self._incoming, None, None
            arrival = (incoming.rounds, self._hop_precopy_bytes)
            run = incoming.resume(delta, where="local")
        elif self._snapshot:
            snap = decode_snapshot(self._snapshot, module=self.module_sha256)
            run = runtime.resume(snap, where="local", wasm=self.module, limits=self.limits)
        else:
            run = runtime.start(
                self.module_sha256,
                args=self.args,
                stdin=self.stdin,
                run_id=self.run_id,
                data_class=self.data_class,
                wasm=self.module,
                limits=self.limits,
            )
        run.on_checkpoint = lambda snap: self._checkpointed(encode_snapshot(snap))
        with self._lock:
            self._local_run = run
        self._arrived("local", reason)
        try:
            if self._target is not None or self._closed:
                run.pause()  # a move asked for while this hop was being set up
            outcome = run.execute()
        except JobError as exc:
            exc.where = "local"
            raise
        finally:
            with self._lock:
                self._local_run = None
            self.resumed_at = run.resumed_at or self.resumed_at
            if arrival is not None:
                self._hop_figures(arrival, run.resumed_at)
        if isinstance(outcome, Paused):
            data = encode_snapshot(outcome.snapshot)
            self._checkpointed(data)
            return _Moved(data, "")
        return RunOutcome(
            self.run_id,
            outcome.exit_code,
            outcome.stdout,
            outcome.stderr,
            tuple(self.hops),
            outcome.fuel_used,
        )

    # -- a hop on a gateway --------------------------------------------------------------------

    def _run_edge(self, client: RunHost, reason: str) -> RunOutcome | _Moved:
        from hearth.runtime.snapshot import decode_snapshot, snapshot_sha256

        conn = client.connection()
        refusal = client.private_refusal(self.data_class == "private")
        if refusal is not None:
            # Nothing of the run is sent: it goes on where it was, from its last snapshot.
            return _Moved(self._snapshot or b"", refusal)
        job_id = f"{self.run_id}.{self._hop_count}"
        correlation = uuid.uuid4().bytes
        blobs = {self.module_sha256: self.module}
        message: RunStart | RunResume
        if self._snapshot:
            decode_snapshot(self._snapshot, module=self.module_sha256)  # refuse it here first
            sha = snapshot_sha256(self._snapshot)
            blobs[sha] = self._snapshot
            message = RunResume(
                job_id=job_id,
                run_id=self.run_id,
                module=self.module_sha256,
                snapshot=sha,
                data_class=self.data_class,
                checkpoint_every_s=self.checkpoint_every_s,
                checkpoint_every_mib=self.checkpoint_every_mib,
                window_bytes=WINDOW_BYTES,
            )
        else:
            message = RunStart(
                job_id=job_id,
                run_id=self.run_id,
                module=self.module_sha256,
                args=self.args,
                stdin=self.stdin,
                data_class=self.data_class,
                checkpoint_every_s=self.checkpoint_every_s,
                checkpoint_every_mib=self.checkpoint_every_mib,
                window_bytes=WINDOW_BYTES,
            )
        for attempt in range(_NEED_BLOB_ROUNDS):
            reply = self._hop_request(conn, message, correlation, reason if attempt == 0 else "")
            if not isinstance(reply, NeedBlob) or reply.sha256 not in blobs:
                break
            client.upload_blob(conn, blobs[reply.sha256], reply.max_chunk, self.data_class)
        if isinstance(reply, Error):
            raise JobError(reply.code, reply.message, job_id=job_id, where="edge")
        if isinstance(reply, RunMoved):
            snapshot = reply.snapshot or self._pieces.take(reply.snapshot_sha256)
            if not snapshot:  # it did not arrive whole: the last checkpoint will do
                return _Moved(self._snapshot or b"", f"{reply.reason} (snapshot lost on the way)")
            self.paused_at = reply.paused_at
            state = decode_snapshot(snapshot, module=self.module_sha256)
            if state.precopy_rounds:  # not a whole snapshot: resumed with its rounds
                return _Moved(b"", reply.reason, reply.to, delta=state)
            self._drop_incoming()  # rounds of a pre-copy that did not end in this move
            self._checkpointed(snapshot)
            return _Moved(snapshot, reply.reason, reply.to)
        if isinstance(reply, RunResult):
            self._drop_incoming()
            return RunOutcome(
                self.run_id,
                reply.exit_code,
                reply.stdout,
                reply.stderr,
                tuple(self.hops),
                reply.fuel_used,
            )
        raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")

    def _hop_request(
        self, conn: Any, message: RunStart | RunResume, correlation: bytes, arrival: str
    ) -> Reply:
        """Send the hop's request and wait for its final answer (checkpoints on the way are
        kept). ``arrival``: the hop's reason, on its first request ("" on a re-send)."""

        handled = 0  # interim messages of this hop: what flow control acknowledges

        def interim(reply: Reply) -> bool:
            nonlocal handled
            if isinstance(reply, RunChunk) and reply.run_id == self.run_id:
                self._pieces.add(reply)
            elif isinstance(reply, RunRound) and reply.run_id == self.run_id:
                self._received_round(reply.round or self._pieces.take(reply.round_sha256))
            elif isinstance(reply, RunCheckpoint) and reply.run_id == self.run_id:
                snapshot = reply.snapshot or self._pieces.take(reply.snapshot_sha256)
                if snapshot:
                    self._checkpointed(snapshot)
            else:
                return False
            handled += 1
            self._acknowledge(conn, handled)
            return True

        future = conn.expect(correlation, interim=interim)
        watching = threading.Event()
        try:
            conn.publish(message, correlation)
            if self.link.every_s > 0:
                watcher = threading.Thread(
                    target=self._watch_link,
                    args=(conn, watching),
                    name=f"hearth-link-{self.run_id}",
                    daemon=True,  # a ping in flight ends by its own timeout
                )
                watcher.start()
            with self._lock:
                self._edge = (conn, message.job_id)
                target = self._target
            if arrival:
                self._arrived(conn.gateway_id or "edge", arrival)
            if target is not None or self._closed:
                # Asked to move while the hop was on its way: the gateway holds the request
                # (queued or running) and moves it as soon as it can.
                self._control(conn, "cancel" if self._closed and not self._pausing else "migrate")
            reply: Reply = future.result(self.deadline_s)
        except FutureTimeout:
            raise TimeoutError(f"no answer from the gateway in {self.deadline_s} s") from None
        finally:
            watching.set()
            conn.forget(correlation)
            with self._lock:
                self._edge = None
        return reply

    # -- pre-copy from a gateway ---------------------------------------------------------------

    def _received_round(self, data: bytes) -> None:
        """Apply one pre-copy round (on the connection's thread, in order) to the instance
        held ready for the run; a round that does not fit drops the pre-copy (the delta that
        ends it is then useless, and the run goes on from its last checkpoint)."""
        from hearth.runtime.snapshot import decode_round

        try:
            memory_round = decode_round(data)
            if memory_round.number == 0:
                self._drop_incoming()
                self._hop_precopy_bytes = 0
                runtime = self._client.migratable_runtime()
                self._incoming = runtime.receive(
                    self.module_sha256, self.run_id, wasm=self.module, limits=self.limits
                )
            if self._incoming is None:
                return
            self._incoming.apply(memory_round)
            self.precopy_rounds += 1
            self.precopy_bytes += len(data)
            self._hop_precopy_bytes += len(data)
        except HearthError as exc:
            log.warning("run %s: pre-copy round dropped (%s)", self.run_id, exc)
            self._drop_incoming()

    def _hop_figures(self, arrival: tuple[int, int], resumed_at: float | None) -> None:
        """Put the pre-copy that brought the current hop here into its Hop."""
        downtime = (resumed_at - self.paused_at) * 1e3 if resumed_at and self.paused_at else 0.0
        with self._lock:
            last = self._hops[-1]
            self._hops[-1] = Hop(last.where, last.reason, arrival[0], arrival[1], downtime)

    def _drop_incoming(self) -> None:
        incoming, self._incoming, self._delta = self._incoming, None, None
        if incoming is not None:
            incoming.close()

    def _after_precopy(self, moved: _Moved, home: bool) -> _Moved:
        """A hop that ended with a pre-copy's delta: kept for the next hop if that is here
        (it resumes on the instance the rounds filled), else made whole (a snapshot that can
        go anywhere); without its rounds, the last checkpoint."""
        from hearth.runtime.snapshot import encode_snapshot

        incoming, delta = self._incoming, moved.delta
        if incoming is None or incoming.rounds != delta.precopy_rounds:
            self._drop_incoming()
            reason = f"{moved.reason} (pre-copy incomplete: from the last checkpoint)"
            return _Moved(self._snapshot or b"", reason)
        if home and not self._closed:
            self._delta = delta
            return _Moved(b"", moved.reason)
        self._incoming = None
        whole = encode_snapshot(incoming.complete(delta))
        self._checkpointed(whole)
        return _Moved(whole, moved.reason, moved.to)

    def _watch_link(self, conn: Any, done: threading.Event) -> None:
        """Ping the gateway while this hop is on it; move the run home once the link counts as
        degraded (LinkPolicy). Ends with the hop."""
        watch = LinkWatch(self.link)
        while not done.wait(self.link.every_s):
            try:
                rtt: float | None = conn.ping_ms(self.link.timeout_s)
            except (HearthError, TimeoutError, FutureTimeout):
                rtt = None
            if done.is_set():
                return
            why = watch.add(rtt)
            if why is not None:
                log.info("run %s: %s; moving it back to this device", self.run_id, why)
                with contextlib.suppress(TimeoutError):
                    self.migrate("local", reason=why, wait_s=None)
                return

    def _acknowledge(self, conn: Any, handled: int) -> None:
        """Tell the gateway this hop's first ``handled`` interim messages are taken in (a
        round: applied), on the connection's thread: publishing does not wait, and nothing
        answers it."""
        with contextlib.suppress(HearthError):
            conn.publish(
                RunControl(run_id=self.run_id, action="received", received=handled),
                uuid.uuid4().bytes,
            )

    def _control(self, conn: Any, action: str) -> None:
        correlation = uuid.uuid4().bytes
        with contextlib.suppress(HearthError, TimeoutError):
            reply = conn.request(
                RunControl(run_id=self.run_id, action=action),  # type: ignore[arg-type]
                correlation,
                self._client.timeout_s,
            )
            if not isinstance(reply, RunAck):
                log.debug("run %s: %s answered %s", self.run_id, action, reply)


def load_module(module: bytes | str | Path) -> bytes:
    """A module's bytes, instrumented for migration if they are not already."""
    from hearth.runtime.asyncify import export_names, instrument, is_instrumented

    data = module if isinstance(module, bytes) else Path(module).read_bytes()
    # Read from the export section: compiling it here would be done again by the first hop.
    return data if is_instrumented(export_names(data)) else instrument(data)
