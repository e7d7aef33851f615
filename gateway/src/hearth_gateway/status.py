"""What ``hearth-gateway status`` shows: a snapshot the daemon rewrites every few seconds in its
state directory (atomically), so the command needs neither the broker nor the daemon's help."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

from hearth_gateway.store import JournalStats

__all__ = ["StatusSnapshot", "format_status", "read_snapshot", "write_snapshot"]

_FILE = "status.json"


class StatusSnapshot(msgspec.Struct, kw_only=True):
    gateway_id: str
    state: str  # online | stopped (and, when read back, "dead" if the pid is gone)
    pid: int
    version: str
    broker: str
    managed_broker: bool
    broker_pid: int | None
    mdns: bool
    runners: list[str]
    providers: list[str]
    models: dict[str, str] = {}  # model sha256 -> the execution provider decided for it
    workers: int
    worker_pids: list[int]
    worker_restarts: int
    workers_recycled: int = 0  # replaced between jobs for their memory or job count
    worker_rss_bytes: list[int] = []  # each live worker's resident memory
    worker_network: str  # "isolated": a network namespace of their own; else why not
    busy_workers: int
    queue_depth: int
    jobs_accepted: int
    jobs_completed: int
    jobs_refused: int
    jobs_duplicate: int
    blobs: int
    blob_bytes: int
    journal: JournalStats | None = None  # the journal's and the audit table's size
    tasks: int = 0  # persistent tasks installed
    capabilities: dict[str, str] = {}  # name -> version
    streams: int = 0  # camera streams seen (with a drop count)
    frames_dropped: int = 0  # stream frames replaced by newer ones (latest frame wins)
    sessions: int = 0  # open odometry sessions
    tier: str = "home"  # cloud: refuses private jobs
    upstream: str = ""  # the upstream gateway's broker, when one is configured
    upstream_connected: bool = False  # connected, and its gateway online
    jobs_forwarded: int = 0  # public jobs sent upstream (since start)
    jobs_fell_back: int = 0  # of those, run here after all (no answer, upstream refused...)
    started_at: float
    updated_at: float


def write_snapshot(state_dir: Path, snapshot: StatusSnapshot) -> None:
    tmp = state_dir / f".{_FILE}.tmp"
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(snapshot)))
    os.replace(tmp, state_dir / _FILE)


def read_snapshot(state_dir: Path) -> StatusSnapshot | None:
    try:
        snapshot = msgspec.json.decode((state_dir / _FILE).read_bytes(), type=StatusSnapshot)
    except (OSError, msgspec.DecodeError):
        return None
    if snapshot.state == "online" and not _alive(snapshot.pid):
        snapshot.state = "dead"  # killed without a chance to say so
    return snapshot


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def format_status(s: StatusSnapshot) -> str:
    uptime_s = (s.updated_at if s.state != "online" else time.time()) - s.started_at
    network = "none (own namespace)" if s.worker_network == "isolated" else s.worker_network
    broker_kind = f"managed, pid {s.broker_pid}" if s.managed_broker else "external"
    lines = [
        f"gateway     {s.gateway_id}  ({s.state}, pid {s.pid}, version {s.version})",
        f"uptime      {_duration(uptime_s)}",
        f"broker      {s.broker} ({broker_kind})",
        f"mDNS        {'advertising _hearth._tcp' if s.mdns else 'off'}",
        f"runners     {', '.join(s.runners)}",
        f"onnx on     {', '.join(s.providers) or '-'}",
        *_model_lines(s.models),
        f"workers     {s.workers} ({s.busy_workers} busy, {s.worker_restarts} restarted, "
        f"{s.workers_recycled} recycled; network: {network})",
        *_memory_lines(s.worker_rss_bytes),
        f"queue       {s.queue_depth} jobs waiting or running",
        f"jobs        {s.jobs_completed} completed, {s.jobs_refused} refused, "
        f"{s.jobs_duplicate} duplicates answered from the journal (since start)",
        f"blobs       {s.blobs} stored, {_size(s.blob_bytes)}",
        *_journal_lines(s.journal),
        f"tasks       {s.tasks} persistent tasks (hearth-gateway tasks list)",
        f"vision      {', '.join(s.capabilities) or '-'}",
        f"streams     {s.streams} streams, {s.frames_dropped} frames dropped (latest frame "
        f"wins), {s.sessions} open sessions",
        f"tier        {s.tier}" + (" (private jobs refused)" if s.tier == "cloud" else ""),
    ]
    if s.upstream:
        lines.append(
            f"upstream    {s.upstream} ({'connected' if s.upstream_connected else 'not connected'}"
            f"): {s.jobs_forwarded} public jobs forwarded, {s.jobs_fell_back} ran here instead"
        )
    return "\n".join(lines)


def _model_lines(models: dict[str, str]) -> list[str]:
    if not models:
        return []
    shown = ", ".join(
        f"{sha[:12]} {p.removesuffix('ExecutionProvider')}" for sha, p in models.items()
    )
    return [f"models      {shown}"]


def _memory_lines(resident: list[int]) -> list[str]:
    if not resident:  # no /proc, or a snapshot from before it was reported
        return []
    return [f"memory      workers resident: {', '.join(_size(n) for n in resident)}"]


def _journal_lines(j: JournalStats | None) -> list[str]:
    if j is None:
        return []
    lines = [
        f"journal     {_size(j.journal_bytes)} of {_size(j.journal_bytes_limit)}: {j.waiting} jobs "
        f"waiting, {j.answers} answers kept",
        f"audit       {j.audit_rows} rows, {_size(j.audit_bytes)} of {_size(j.audit_bytes_limit)}",
        f"state file  {_size(j.file_bytes)} on disk (journal, audit, tasks, indexes, free pages)",
    ]
    if j.evicted or j.unkept:
        lines[0] += (
            f" ({j.evicted} dropped early for room, {j.unkept} too large to keep; since start)"
        )
    return lines


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"
