"""Policies are data: limits and quotas come from policies/*.toml. This module is the one place
that reads them and the one place that decides admission.

The defaults below are the embedded policy (the daemon runs without any file); the repo's
policies/default.toml spells out the same values, and a test keeps the two equal.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import msgspec

from hearth.errors import ErrorCode
from hearth.runtime.limits import WasmLimits
from hearth_gateway.errors import ConfigError

__all__ = [
    "Admission",
    "LimitsPolicy",
    "MigrationPolicy",
    "OnnxPolicy",
    "PlacementPolicy",
    "Policy",
    "QuotaLimits",
    "QuotasPolicy",
    "TasksPolicy",
    "VisionPolicy",
    "WasmPolicy",
    "WorkersPolicy",
    "filter_covers",
    "home_grant_error",
    "load_policy",
    "task_topic_error",
    "topic_matches",
]

KiB = 1024
MiB = 1024 * KiB


class WasmPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fuel: int = 2_000_000_000  # wasm instructions (roughly) per job
    memory_bytes: int = 256 * MiB
    output_bytes: int = 8 * MiB  # stdout + stderr
    scratch_bytes: int = 64 * MiB  # files left in the job's /scratch directory
    wall_timeout_s: float = 30.0  # backstop: the worker is killed past this

    def limits(self) -> WasmLimits:
        return WasmLimits(
            fuel=self.fuel,
            memory_bytes=self.memory_bytes,
            output_bytes=self.output_bytes,
            scratch_bytes=self.scratch_bytes,
        )


class OnnxPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    wall_timeout_s: float = 60.0


class LimitsPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_message_bytes: int = 16 * MiB  # one MQTT payload (a job with its inputs, or a chunk)
    max_blob_bytes: int = 512 * MiB  # one module or model
    max_chunk_bytes: int = 4 * MiB  # data bytes per BlobChunk
    max_queue: int = 256  # jobs waiting or running, all clients together
    max_inflight_per_client: int = 64  # queued or running jobs of one device
    upload_idle_timeout_s: float = 60.0  # a half-sent blob is dropped after this
    answer_retention_s: float = 24 * 3600.0  # stored answers for duplicate job ids
    # The journal on disk: answers kept and the requests of jobs not yet answered. Past it the
    # oldest answers go first (store.py); waiting jobs never do (admission bounds them).
    journal_bytes: int = 256 * MiB
    # A larger request waits for its answer in a file of its own; a larger answer is not kept
    # (the same job id sent again runs the job again).
    journal_inline_bytes: int = 64 * KiB
    audit_retention_s: float = 30 * 24 * 3600.0  # audit rows (decisions, refusals) kept
    audit_bytes: int = 64 * MiB  # the audit table on disk; past it the oldest rows go first
    # Free space kept in the state directory's file system (storage.py): below the larger of
    # the two, uploads, jobs and task installs are refused with storage_full.
    storage_reserve_percent: float = 5.0
    storage_reserve_bytes: int = 64 * MiB


class TasksPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fuel_per_event: int = 200_000_000
    memory_bytes: int = 16 * MiB  # linear memory of one task
    max_tasks: int = 2000  # on this gateway
    max_tasks_per_client: int = 100
    max_failures: int = 5  # consecutive failed events before a task is suspended
    backoff_s: float = 1.0  # after a failed event, doubled per consecutive failure
    max_backlog: int = 1000  # queued events per task; more are dropped and counted
    max_actions_per_event: int = 64  # publish + notify + log calls
    max_payload_bytes: int = 65_536  # event payload, published payload
    wall_timeout_s: float = 10.0  # per event
    # The home's own broker (home.py): the topic trees a task may be granted there at all, as
    # MQTT filters without the "home:" prefix. Empty: none (the owner opens them).
    home_read: list[str] = []
    home_publish: list[str] = []


class VisionPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_megapixels: float = 40.0  # read from the image header; larger images are not decoded
    wall_timeout_s: float = 30.0  # per frame or image
    session_idle_timeout_s: float = 60.0  # an odometry session without frames is closed
    max_sessions_per_client: int = 4
    max_streams: int = 64  # camera streams with a waiting frame or a background model


class PlacementPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where public work may run (placement.py decides; private work never leaves the box)."""

    # Public jobs go to the upstream gateway when every worker is busy and more than this many
    # jobs are waiting for one (or when this gateway lacks the job's runner).
    upstream_when_queue_over: int = 4
    upstream_max_in_flight: int = 64  # public jobs forwarded, not yet answered; 0: never forward
    upstream_timeout_s: float = 60.0  # no answer from the upstream by then: the job runs here


class WorkersPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When a worker process is replaced by a fresh one (workers.py): after a job, before the
    next, never during one. Memory a worker's heap once grew to is not given back otherwise."""

    max_rss_bytes: int = 384 * MiB  # resident memory after a job; 0: no limit
    max_jobs: int = 0  # jobs run by one process; 0: no limit


class MigrationPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Migratable runs (docs/migration.md): how often their state goes back to their device,
    when the gateway sends them home, and how long one hop may hold a worker."""

    checkpoint_every_s: float = 5.0  # a run's checkpoints to its device (it may ask otherwise)
    # ... or after this much I/O progress (MiB read plus written by the run), whichever first;
    # 0: by time only. The device may ask otherwise.
    checkpoint_every_mib: float = 64.0
    # A run with at least this much memory leaving the gateway is pre-copied to its device
    # (run_round messages while it goes on, then a short stop); 0: always stop and copy.
    precopy_over_mib: float = 16.0
    # More jobs than this waiting, every worker busy: the longest-running run goes back to its
    # device, freeing a worker for work that cannot move. 0: never.
    evict_when_queue_over: int = 8
    wall_timeout_s: float = 3600.0  # one hop on this gateway; the run goes on at its device


NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]


class QuotaLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One device's or application's quotas (quota.py enforces them); unset: no limit."""

    cpu_s_per_day: NonNegativeFloat | None = None  # job run time per UTC day, seconds
    concurrent_jobs: NonNegativeInt | None = None  # jobs queued or running at once
    stored_bytes: NonNegativeInt | None = None  # blobs and snapshots uploaded and still held
    tasks: NonNegativeInt | None = None  # persistent tasks installed

    def over(self, other: QuotaLimits) -> QuotaLimits:
        """These limits, with ``other``'s where these set none."""
        mine = msgspec.structs.asdict(self)
        theirs = msgspec.structs.asdict(other)
        return QuotaLimits(**{k: theirs[k] if v is None else v for k, v in mine.items()})


class QuotasPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-device and per-application quotas (docs/quotas.md). A device's quotas cover all its
    applications together; an application's cover its use on one device."""

    device: QuotaLimits = QuotaLimits()  # every device
    app: QuotaLimits = QuotaLimits()  # every application (of each device)
    devices: dict[str, QuotaLimits] = {}  # by device id, over ``device`` key by key
    apps: dict[str, QuotaLimits] = {}  # by application name, over ``app`` key by key


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    wasm: WasmPolicy = WasmPolicy()
    onnx: OnnxPolicy = OnnxPolicy()
    limits: LimitsPolicy = LimitsPolicy()
    tasks: TasksPolicy = TasksPolicy()
    vision: VisionPolicy = VisionPolicy()
    placement: PlacementPolicy = PlacementPolicy()
    workers: WorkersPolicy = WorkersPolicy()
    migration: MigrationPolicy = MigrationPolicy()
    quotas: QuotasPolicy = QuotasPolicy()


def load_policy(paths: Iterable[Path]) -> Policy:
    """Merge TOML files (later files win, table by table, key by key) over the defaults."""
    merged: dict[str, Any] = msgspec.to_builtins(Policy())
    for path in paths:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"policy {path}: {exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"policy {path}: [{section}] must be a table")
            merged.setdefault(section, {}).update(values)
    try:
        return msgspec.convert(merged, Policy)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"policy: {exc}") from None


class Admission:
    """Counts queued-or-running jobs, globally and per client, and admits or refuses new ones.
    Used from the daemon's one loop thread only (admitted at dispatch, released on answer)."""

    def __init__(self, limits: LimitsPolicy) -> None:
        self._limits = limits
        self.in_flight = 0
        self._per_client: dict[str, int] = {}

    def admit(self, client_id: str) -> ErrorCode | None:
        """None when admitted (the caller must ``release`` later), else the refusal code."""
        if self.in_flight >= self._limits.max_queue:
            return ErrorCode.OVERLOADED
        current = self._per_client.get(client_id, 0)
        if current >= self._limits.max_inflight_per_client:
            return ErrorCode.QUOTA_EXCEEDED
        self.in_flight += 1
        self._per_client[client_id] = current + 1
        return None

    def release(self, client_id: str) -> None:
        self.in_flight -= 1
        left = self._per_client.get(client_id, 1) - 1
        if left:
            self._per_client[client_id] = left
        else:
            self._per_client.pop(client_id, None)


# --- topic grants for persistent tasks ---------------------------------------------------------

_RESERVED_PREFIX = "hearth/"  # the protocol's own topics: never readable or writable by a task


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching: ``+`` one level, ``#`` the rest (including none)."""
    f_parts = topic_filter.split("/")
    t_parts = topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts):
            return False
        if part != "+" and part != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


def filter_covers(grant: str, topic_filter: str) -> bool:
    """True when every topic ``topic_filter`` can match is matched by ``grant``."""
    g_parts = grant.split("/")
    f_parts = topic_filter.split("/")
    for i, part in enumerate(g_parts):
        if part == "#":
            return True
        if i >= len(f_parts):
            return False
        if f_parts[i] == "#":
            return False
        if part != "+" and (f_parts[i] == "+" or part != f_parts[i]):
            return False
    return len(g_parts) == len(f_parts)


def task_topic_error(topic: str, *, is_filter: bool) -> str | None:  # noqa: PLR0911
    """Why a task may not use this topic (or filter), or None if it may."""
    if not topic or len(topic) > 256 or "\0" in topic:
        return "empty or too long"
    if topic.startswith(_RESERVED_PREFIX) or topic.startswith("$"):
        return f"{_RESERVED_PREFIX}... and $... are reserved"
    parts = topic.split("/")
    if parts[0] in ("+", "#"):
        return "the first level must be named (a wildcard there reaches hearth/... too)"
    for i, part in enumerate(parts):
        if part in ("+", "#"):
            if not is_filter:
                return "wildcards are not allowed in a topic to publish to"
            if part == "#" and i != len(parts) - 1:
                return "'#' must be the last level"
        elif "+" in part or "#" in part:
            return "a wildcard must be a whole level"
    return None


# A task's topic on the home's own broker (home.py) carries this prefix; the rest is the topic
# there. It is part of the first level, so topic_matches and filter_covers need no change.
HOME_PREFIX = "home:"
# The gateway's own topics on the home broker (its status mirror, Home Assistant discovery and
# commands): never a task's.
_HOME_RESERVED = ("hearth/", "homeassistant/")


def home_grant_error(grant: str, allowed: list[str], *, enabled: bool) -> str | None:
    """Why a task may not be granted ``grant`` (a topic or filter on the home broker, with the
    prefix), given the trees the owner's policy allows (tasks.home_read or home_publish)."""
    if not enabled:
        return "this gateway has no home broker (set home_broker)"
    topic = grant.removeprefix(HOME_PREFIX)
    if topic.startswith(_HOME_RESERVED):
        return "hearth/... and homeassistant/... on the home broker are the gateway's own"
    if not any(filter_covers(tree, topic) for tree in allowed):
        trees = ", ".join(allowed) or "none"
        return f"outside the home broker's trees the owner allows tasks ({trees})"
    return None
