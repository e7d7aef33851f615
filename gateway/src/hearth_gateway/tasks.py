"""Persistent tasks: automations and long jobs that outlive the device that started them.

Everything here runs on the daemon's loop. A task's events (MQTT messages on its trigger
filters, timer ticks) queue per task and run one at a time in the worker pool (runners/task.py);
each outcome brings a new checkpoint, which is stored together with the deletion of the events
it covers, in one SQLite transaction. Message events are written to the inbox before the broker
gets its PUBACK, so an event is never lost to a crash: after a restart the task resumes from its
last checkpoint and the inbox events after it are delivered again.

Grants are enforced here (the worker's answer to the guest is a courtesy): a task publishes only
to topics its ``publish`` grants match, and receives only messages its ``read`` grants match.
Every refusal is audited.

A task whose owner's pairing is revoked is suspended at once (``owners_revoked``), and what an
event already running produces is dropped: nothing it does reaches the broker. Its state stays;
the owner paired again under the same id may resume it, and the box owner may cancel it.

With the state directory full (storage.py) installs are refused with ``storage_full``; events
that cannot be written to the inbox are dropped and counted, and checkpoints wait for room.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from hearth.errors import ErrorCode
from hearth.protocol import (
    Error,
    NeedBlob,
    Notification,
    Reply,
    Task,
    TaskControl,
    TaskInfo,
    TaskInstall,
    TaskList,
    TaskListResult,
    encode,
    notify_topic,
)
from hearth_gateway.blobs import BlobStore
from hearth_gateway.dispatch import RESERVED_CLIENT_ID, PeerLog
from hearth_gateway.loop import Loop, Timer
from hearth_gateway.metrics import Metrics
from hearth_gateway.policy import (
    HOME_PREFIX,
    TasksPolicy,
    filter_covers,
    home_grant_error,
    task_topic_error,
    topic_matches,
)
from hearth_gateway.reply_to import ReplyTo
from hearth_gateway.runners import TaskEvent, TaskOutcome
from hearth_gateway.storage import StorageGuard, is_storage_full
from hearth_gateway.store import Store
from hearth_gateway.workers import QueuedJob, WorkerPool

__all__ = ["ADMIN", "TaskManager"]

log = logging.getLogger(__name__)

# The box's owner, through the local control socket: sees every task. Reserved: the dispatcher
# drops MQTT requests that claim it.
ADMIN = RESERVED_CLIENT_ID

_MESSAGE, _TIMER = 1, 2
_OWNER_FLUSH_S = 10.0  # how often "owner last seen" times are written down

Publish = Callable[[str, bytes], None]  # topic, payload (QoS 1, not retained)
Subscribe = Callable[[str, bool], None]  # filter, True to subscribe / False to unsubscribe

_outcome_decoder = msgspec.msgpack.Decoder(TaskOutcome | Error)
_info_decoder = msgspec.msgpack.Decoder(TaskInfo)
_spec_decoder = msgspec.msgpack.Decoder(TaskInstall)
_kv_decoder = msgspec.msgpack.Decoder(dict[str, bytes])


@dataclass
class _Task:
    task_id: str
    owner: str
    spec: TaskInstall
    info: TaskInfo
    checkpoint: bytes = b""
    kv: dict[str, bytes] = field(default_factory=dict)
    # (inbox id or None for a timer tick, topic, payload)
    pending: deque[tuple[int | None, str, bytes]] = field(default_factory=deque)
    busy: bool = False
    backoff: Timer | None = None
    timers: list[Timer] = field(default_factory=list)
    consecutive_failures: int = 0
    since_checkpoint: int = 0  # events handled since the last stored checkpoint
    covered: list[int] = field(default_factory=list)  # inbox ids the next checkpoint covers
    checkpointed_at: float = field(default_factory=time.monotonic)
    removed: bool = False

    @property
    def read(self) -> list[str]:
        return self.spec.read or [t.topic for t in self.spec.triggers if t.topic]


class TaskManager:
    def __init__(
        self,
        *,
        loop: Loop,
        store: Store,
        blobs: BlobStore,
        pool: WorkerPool,
        policy: TasksPolicy,
        max_chunk: int,
        publish: Publish,
        subscribe: Subscribe,
        storage: StorageGuard | None = None,
        home_broker: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self._loop = loop
        # Whether "home:" topics (the home's own broker, home.py) may be granted at all.
        self._home_broker = home_broker
        self._metrics = metrics or Metrics()  # events, actions and log lines (metrics.py)
        self._storage = storage
        self._revoked: frozenset[str] = frozenset()  # owners whose pairing was revoked
        self._store = store
        self._blobs = blobs
        self._pool = pool
        self._policy = policy
        self._max_chunk = max_chunk
        self._publish = publish
        self._subscribe = subscribe
        self._tasks: dict[str, _Task] = {}
        # Trigger filter -> the tasks it wakes. A message is matched by one dict lookup for
        # filters without wildcards and a scan of the wildcard ones only (a scan of every task
        # cost ~2 us per task per message: 2 ms at 1000 tasks).
        self._filters: dict[str, set[str]] = {}
        self._wildcards: set[str] = set()
        self._owners_seen: dict[str, float] = {}
        self._owners_dirty: dict[str, float] = {}
        self._owners_flushed = time.monotonic()
        self._peer_log = PeerLog()

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> int:
        """Load every task and its unfinished events; returns how many tasks."""
        self._owners_seen = self._store.owners()
        for task_id, owner, spec, info, checkpoint, kv in self._store.tasks():
            task = _Task(
                task_id=task_id,
                owner=owner,
                spec=_spec_decoder.decode(spec),
                info=_info_decoder.decode(info),
                checkpoint=checkpoint,
                kv=_kv_decoder.decode(kv) if kv else {},
            )
            self._tasks[task_id] = task
            self._arm(task)
        for inbox_id, task_id, topic, payload in self._store.inbox():
            owner_task = self._tasks.get(task_id)
            if owner_task is None:
                self._store.drop_inbox([inbox_id])
            else:
                owner_task.pending.append((inbox_id, topic, payload))
        for task in self._tasks.values():
            self._dispatch(task)
        self._loop.every(2.0, self.housekeeping)
        return len(self._tasks)

    def _arm(self, task: _Task) -> None:
        """Subscribe its trigger filters and start its timers."""
        for trigger in task.spec.triggers:
            if trigger.topic:
                users = self._filters.setdefault(trigger.topic, set())
                if not users:
                    self._subscribe(trigger.topic, True)
                    if "+" in trigger.topic or "#" in trigger.topic:
                        self._wildcards.add(trigger.topic)
                users.add(task.task_id)
            if trigger.every_s:
                self._start_timer(task, trigger.every_s)

    def _start_timer(self, task: _Task, every_s: float) -> None:
        def tick() -> None:
            if task.removed:
                return
            task.timers.remove(timer)
            self._start_timer(task, every_s)
            if task.info.state != "running":
                return
            # Ticks coalesce: a task that is behind gets one, not a pile.
            if not any(inbox_id is None for inbox_id, _, _ in task.pending):
                task.pending.append((None, "$timer", b""))
                self._dispatch(task)

        timer = self._loop.call_later(every_s, tick)
        task.timers.append(timer)

    # -- requests from devices (or the admin socket) --------------------------------------------

    def owner_seen(self, client_id: str) -> None:
        now = time.time()
        self._owners_seen[client_id] = now
        self._owners_dirty[client_id] = now

    def install(self, owner: str, request: TaskInstall) -> Reply:
        refusal = self._check_install(owner, request)
        if refusal is not None:
            self._store.audit(owner, "task_install", request.name, "refused", refusal)
            return Error(code=ErrorCode.FORBIDDEN, message=refusal)
        if self._storage is not None and not self._storage.room_for(len(encode(request))):
            return Error(code=ErrorCode.STORAGE_FULL, message="the gateway's storage is full")
        if not self._blobs.has(request.module):
            return NeedBlob(job_id=request.name, sha256=request.module, max_chunk=self._max_chunk)
        task_id = f"t-{secrets.token_hex(6)}"
        info = TaskInfo(
            task_id=task_id,
            name=request.name,
            owner=owner,
            state="running",
            created_at=time.time(),
            expires_at=request.expires_at,
            idle_timeout_s=request.idle_timeout_s,
            triggers=request.triggers,
            read=request.read or [t.topic for t in request.triggers if t.topic],
            publish=request.publish,
            data_class=request.data_class,
        )
        task = _Task(
            task_id, owner, request, info, kv={k: v.encode() for k, v in request.config.items()}
        )
        if not self._persist(task):
            return Error(code=ErrorCode.STORAGE_FULL, message="the gateway's storage is full")
        self._tasks[task_id] = task
        self._store.audit(owner, "task_install", task_id, "allowed", request.name)
        self._arm(task)
        log.info("task %s (%s) installed by %s", task_id, request.name, owner)
        return Task(task=task.info)

    def _check_install(self, owner: str, request: TaskInstall) -> str | None:  # noqa: PLR0911, PLR0912
        if not request.triggers:
            return "a task needs at least one trigger"
        for trigger in request.triggers:
            if (trigger.topic is None) == (trigger.every_s is None):
                return "each trigger has either a topic or every_s"
        for trigger in request.triggers:
            if trigger.topic and (why := task_topic_error(trigger.topic, is_filter=True)):
                return f"trigger {trigger.topic!r}: {why}"
        read = request.read or [t.topic for t in request.triggers if t.topic]
        for topic_filter in read:
            if why := task_topic_error(topic_filter, is_filter=True):
                return f"read grant {topic_filter!r}: {why}"
        for topic in request.publish:
            if why := task_topic_error(topic, is_filter=True):
                return f"publish grant {topic!r}: {why}"
        for trigger in request.triggers:
            if trigger.topic and not any(filter_covers(g, trigger.topic) for g in read):
                return f"trigger {trigger.topic!r} is outside the task's read grants"
        if why := self._home_refusal(read, request.publish):
            return why
        if len(self._tasks) >= self._policy.max_tasks:
            return f"this gateway holds its maximum of {self._policy.max_tasks} tasks"
        mine = sum(1 for t in self._tasks.values() if t.owner == owner)
        if owner != ADMIN and mine >= self._policy.max_tasks_per_client:
            return f"this device already has {mine} tasks"
        if request.expires_at is not None and request.expires_at <= time.time():
            return "expires_at is in the past"
        return None

    def _home_refusal(self, read: list[str], publish: list[str]) -> str | None:
        """Grants on the home broker must lie in the trees the owner's policy opens."""
        policy = self._policy
        for kind, grants, allowed in (
            ("read", read, policy.home_read),
            ("publish", publish, policy.home_publish),
        ):
            for grant in grants:
                if grant.startswith(HOME_PREFIX) and (
                    why := home_grant_error(grant, allowed, enabled=self._home_broker)
                ):
                    return f"{kind} grant {grant!r}: {why}"
        return None

    def control(self, client_id: str, request: TaskControl) -> Reply:
        task = self._tasks.get(request.task_id)
        if task is None or client_id not in (ADMIN, task.owner):
            # Someone else's task looks the same as no task at all.
            return Error(code=ErrorCode.FORBIDDEN, message=f"no task {request.task_id} of yours")
        if request.action == "pause" and task.info.state == "running":
            self._set(task, state="paused", reason=f"paused by {client_id}")
        elif request.action == "resume" and task.owner in self._revoked:
            message = (
                f"task {task.task_id}'s owner {task.owner} is revoked: pair it again to "
                "resume the task, or cancel it"
            )
            self._store.audit(client_id, "task_resume", task.task_id, "refused", message)
            return Error(code=ErrorCode.FORBIDDEN, message=message)
        elif request.action == "resume" and task.info.state in ("paused", "suspended"):
            task.consecutive_failures = 0
            self._set(task, state="running", reason="")
            self._dispatch(task)
        elif request.action == "cancel":
            self._remove(task, "cancelled", f"cancelled by {client_id}")
        if request.action != "show":
            self._store.audit(client_id, f"task_{request.action}", task.task_id, "allowed", "")
        return Task(task=task.info)

    def list_tasks(self, client_id: str, _request: TaskList | None = None) -> TaskListResult:
        return TaskListResult(
            tasks=[t.info for t in self._tasks.values() if client_id in (ADMIN, t.owner)]
        )

    # -- events ---------------------------------------------------------------------------------

    def _readers(self, topic: str) -> list[_Task]:
        """Running tasks that a message on ``topic`` wakes (others are counted as dropped)."""
        task_ids = set(self._filters.get(topic, ()))
        for topic_filter in self._wildcards:
            if topic_matches(topic_filter, topic):
                task_ids |= self._filters[topic_filter]
        targets = []
        for task_id in sorted(task_ids):  # a stable order, whatever the set's
            task = self._tasks.get(task_id)
            if task is None or not any(topic_matches(g, topic) for g in task.read):
                continue  # the grant check is redundant with install's: kept as the last word
            if task.info.state == "running":
                targets.append(task)
            else:
                self._count(task, dropped=1)  # paused or suspended: not delivered
        return targets

    def on_message(self, topic: str, payload: bytes) -> None:
        """A message on a non-protocol topic: queue it for every task that reads it."""
        targets = self._readers(topic)
        if not targets:
            return
        if len(payload) > self._policy.max_payload_bytes:
            self._peer_log.warning(
                "task-payload", "dropping %d-byte message on %s for tasks", len(payload), topic
            )
            for task in targets:
                self._count(task, dropped=1)
            return
        accepted = [t for t in targets if len(t.pending) < self._policy.max_backlog]
        for task in targets:
            if task not in accepted:
                self._count(task, dropped=1)
        try:
            ids = self._store.add_inbox_many([(t.task_id, topic, payload) for t in accepted])
        except Exception as exc:
            if not is_storage_full(exc):
                raise
            self._storage_hit(exc)  # not written, so not taken: dropped and counted
            for task in accepted:
                self._count(task, dropped=1)
            return
        for task, inbox_id in zip(accepted, ids, strict=True):
            task.pending.append((inbox_id, topic, payload))
            self._dispatch(task)

    def _dispatch(self, task: _Task) -> None:
        if task.busy or task.removed or task.backoff is not None or not task.pending:
            return
        if task.info.state != "running":
            return
        inbox_id, topic, payload = task.pending[0]
        task.busy = True
        event = TaskEvent(
            job_id=f"{task.task_id}#{task.info.events + task.info.failures + 1}",
            task_id=task.task_id,
            module=task.spec.module,
            kind=_TIMER if inbox_id is None else _MESSAGE,
            topic=topic,
            payload=payload,
            state=task.checkpoint,
            kv=task.kv,
            publish=task.spec.publish,
        )
        # Nobody waits on a topic: the outcome comes back to completed() here.
        owner = ReplyTo(task.owner, "")
        blob_path = str(self._blobs.path(task.spec.module))
        self._pool.submit(QueuedJob(reply_to=owner, job=event, blob_path=blob_path))

    def completed(self, item: QueuedJob, reply: bytes, _final: bool) -> None:
        """Worker pool callback for a task event."""
        event = item.job
        assert isinstance(event, TaskEvent)
        task = self._tasks.get(event.task_id)
        if task is None:
            return
        task.busy = False
        if task.removed:
            return
        inbox_id, _, _ = task.pending.popleft()
        if inbox_id is not None:
            task.covered.append(inbox_id)
        try:
            outcome = _outcome_decoder.decode(reply)
        except msgspec.DecodeError:
            outcome = Error(code=ErrorCode.INTERNAL, message="unreadable task outcome")
        if isinstance(outcome, TaskOutcome) and outcome.ok:
            self._metrics.task_event("ok")
            self._succeeded(task, outcome)
        else:
            self._metrics.task_event("failed")
            message = outcome.message if isinstance(outcome, Error) else outcome.error
            self._metrics.task_log(task.task_id, f"event failed: {message}")
            self._failed(task, message)
        self._dispatch(task)

    def _succeeded(self, task: _Task, outcome: TaskOutcome) -> None:
        publishes = refused = 0
        if task.owner in self._revoked:
            # An event that was running when its owner was revoked: its state is kept, what
            # it would have said is not.
            dropped = len(outcome.actions)
            outcome = msgspec.structs.replace(outcome, actions=[])
            if dropped:
                self._store.audit(
                    task.task_id, "publish", "", "refused", f"owner revoked ({dropped} dropped)"
                )
        for action in outcome.actions:
            self._metrics.task_action(
                task.task_id, action.kind, action.payload.decode(errors="replace")
            )
            if action.kind in ("publish", "refused"):
                # The worker already told the guest; the decision that counts is this one.
                if action.kind == "publish" and any(
                    topic_matches(g, action.topic) for g in task.spec.publish
                ):
                    self._publish(action.topic, action.payload)
                    publishes += 1
                else:
                    refused += 1
                    self._store.audit(
                        task.task_id,
                        "publish",
                        action.topic,
                        "refused",
                        "outside the task's publish grants",
                    )
                    self._peer_log.warning(
                        "task-grant", "task %s may not publish to %s", task.task_id, action.topic
                    )
            elif action.kind == "notify":
                note = Notification(
                    task_id=task.task_id,
                    name=task.spec.name,
                    message=action.payload.decode(errors="replace"),
                    at=time.time(),
                )
                self._publish(notify_topic(task.owner), encode(note))
            elif action.kind == "log":
                self._peer_log.warning(
                    f"task-log-{task.task_id}",
                    "task %s: %s",
                    task.task_id,
                    action.payload.decode(errors="replace"),
                )
        task.checkpoint = outcome.state
        task.kv = outcome.kv
        task.consecutive_failures = 0
        task.since_checkpoint += 1
        info = task.info
        task.info = msgspec.structs.replace(
            info,
            events=info.events + 1,
            publishes=info.publishes + publishes,
            refused=info.refused + refused,
            last_event_at=time.time(),
            fuel_used=info.fuel_used + outcome.fuel_used,
            memory_bytes=outcome.memory_bytes,
            checkpoint_bytes=len(outcome.state),
        )
        every_s = task.spec.checkpoint_every_s
        due = task.since_checkpoint >= task.spec.checkpoint_every or (
            every_s is not None and time.monotonic() - task.checkpointed_at >= every_s
        )
        if due:
            self._persist(task)

    def _failed(self, task: _Task, message: str) -> None:
        task.consecutive_failures += 1
        info = task.info
        task.info = msgspec.structs.replace(
            info, failures=info.failures + 1, last_error=message, last_event_at=time.time()
        )
        log.warning(
            "task %s: event failed (%d in a row): %s",
            task.task_id,
            task.consecutive_failures,
            message,
        )
        if task.consecutive_failures >= self._policy.max_failures:
            dropped = len(task.pending)
            task.pending.clear()
            self._count(task, dropped=dropped)
            self._set(
                task,
                state="suspended",
                reason=f"{task.consecutive_failures} failed events in a row; last: {message}",
            )
            self._store.audit(task.task_id, "suspend", task.task_id, "allowed", task.info.reason)
            self._notify(task, f"suspended: {task.info.reason}")
        else:
            delay = self._policy.backoff_s * 2 ** (task.consecutive_failures - 1)

            def retry() -> None:
                task.backoff = None
                self._dispatch(task)

            task.backoff = self._loop.call_later(delay, retry)
        self._persist(task)  # the failed event is consumed; the checkpoint stays as it was

    def _notify(self, task: _Task, message: str) -> None:
        note = Notification(
            task_id=task.task_id, name=task.spec.name, message=message, at=time.time()
        )
        self._publish(notify_topic(task.owner), encode(note))

    # -- lifecycle ------------------------------------------------------------------------------

    def housekeeping(self) -> None:
        now = time.time()
        for task in list(self._tasks.values()):
            if task.spec.expires_at is not None and now >= task.spec.expires_at:
                self._remove(task, "expired", "its expiry time passed")
            elif task.spec.idle_timeout_s is not None:
                seen = max(self._owners_seen.get(task.owner, 0.0), task.info.created_at)
                if now - seen > task.spec.idle_timeout_s:
                    self._remove(
                        task,
                        "expired",
                        f"owner {task.owner} not seen for {task.spec.idle_timeout_s:.0f} s",
                    )
            if not task.removed and (
                task.since_checkpoint
                and task.spec.checkpoint_every_s is not None
                and time.monotonic() - task.checkpointed_at >= task.spec.checkpoint_every_s
            ):
                self._persist(task)
        if self._owners_dirty and time.monotonic() - self._owners_flushed >= _OWNER_FLUSH_S:
            self._owners_flushed = time.monotonic()
            try:
                self._store.put_owners(self._owners_dirty)
            except Exception as exc:
                if not is_storage_full(exc):
                    raise
                self._storage_hit(exc)  # kept dirty: written when there is room
                return
            self._owners_dirty = {}

    def _remove(self, task: _Task, state: str, reason: str) -> None:
        """Cancel, expiry and idle cleanup: the task and all its stored state go."""
        task.removed = True
        for timer in task.timers:
            timer.cancel()
        if task.backoff is not None:
            task.backoff.cancel()
        for trigger in task.spec.triggers:
            if trigger.topic:
                users = self._filters.get(trigger.topic, set())
                users.discard(task.task_id)
                if not users:
                    self._filters.pop(trigger.topic, None)
                    self._wildcards.discard(trigger.topic)
                    self._subscribe(trigger.topic, False)
        self._set(task, state=state, reason=reason)
        self._tasks.pop(task.task_id, None)
        self._store.delete_task(task.task_id)
        self._store.audit(task.task_id, f"task_{state}", task.task_id, "allowed", reason)
        log.info("task %s (%s) %s: %s", task.task_id, task.spec.name, state, reason)
        if state == "expired":
            self._notify(task, f"removed: {reason}")

    def _set(self, task: _Task, *, state: str, reason: str) -> None:
        task.info = msgspec.structs.replace(task.info, state=state, reason=reason)
        if not task.removed:
            self._persist(task)

    def _count(self, task: _Task, *, dropped: int) -> None:
        self._metrics.task_event("dropped", dropped)
        if dropped:
            task.info = msgspec.structs.replace(task.info, dropped=task.info.dropped + dropped)

    def _persist(self, task: _Task) -> bool:
        """Store the task's state; False when there was no room (it stays due: the next
        checkpoint, or close(), tries again, and the inbox still covers its events)."""
        try:
            self._store.put_task(
                task.task_id,
                task.owner,
                spec=encode(task.spec),
                info=msgspec.msgpack.encode(task.info),
                checkpoint=task.checkpoint,
                kv=msgspec.msgpack.encode(task.kv),
                done_inbox=task.covered,
            )
        except Exception as exc:
            if not is_storage_full(exc):
                raise
            self._storage_hit(exc)
            task.since_checkpoint = max(1, task.since_checkpoint)
            return False
        task.covered = []
        task.since_checkpoint = 0
        task.checkpointed_at = time.monotonic()
        return True

    def _storage_hit(self, exc: BaseException) -> None:
        if self._storage is not None:
            self._storage.hit(exc)

    # -- revocation -----------------------------------------------------------------------------

    def owners_revoked(self, revoked: frozenset[str]) -> int:
        """The device ids whose pairing is revoked now (pairing.py): their running and paused
        tasks are suspended at once, audited; returns how many. Called on every change and at
        start; an id paired again leaves the set, and its tasks wait for a resume."""
        self._revoked = revoked
        suspended = 0
        for task in self._tasks.values():
            if task.owner not in revoked or task.info.state not in ("running", "paused"):
                continue
            reason = f"owner {task.owner}'s pairing was revoked"
            self._set(task, state="suspended", reason=reason)
            self._store.audit("admin", "task_suspend", task.task_id, "allowed", reason)
            log.info("task %s (%s) suspended: %s", task.task_id, task.spec.name, reason)
            suspended += 1
        return suspended

    def close(self) -> None:
        """Store what has not been checkpointed yet (the inbox still covers it otherwise)."""
        for task in self._tasks.values():
            if task.since_checkpoint:
                self._persist(task)
        if self._owners_dirty:
            self._store.put_owners(self._owners_dirty)
            self._owners_dirty = {}

    @property
    def count(self) -> int:
        return len(self._tasks)
