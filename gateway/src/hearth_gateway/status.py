"""What ``hearth-gateway status`` shows: a snapshot the daemon rewrites every few seconds in its
state directory (atomically), so the command needs neither the broker nor the daemon's help."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import msgspec

from hearth_gateway.store import JournalStats

__all__ = ["StatusSnapshot", "format_status", "read_snapshot", "write_snapshot"]

_FILE = "status.json"
_PAGE = 4096  # the snapshot's text is padded to whole pages (write_snapshot)


class StatusSnapshot(msgspec.Struct, kw_only=True):
    gateway_id: str
    state: str  # online | stopped (and, when read back, "dead" if the pid is gone)
    pid: int
    version: str
    broker: str
    managed_broker: bool
    broker_pid: int | None
    mdns: bool
    mdns_name: str = ""  # the instance name owned on the LAN (renamed "NAME (2)" on a conflict)
    listeners: dict[str, str] = {}  # what each is for (loopback, lan-tls, pairing) -> address
    paired_devices: int = 0  # devices with a valid certificate
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
    storage_full: bool = False  # uploads, jobs and task installs refused with storage_full
    storage_free_bytes: int = 0  # in the state directory's file system
    storage_total_bytes: int = 0
    storage_reserve_bytes: int = 0  # kept free (policy limits.storage_reserve_*)
    storage_refused: int = 0  # requests answered storage_full (since start)
    broker_dropped: int = 0  # messages the managed broker dropped for clients that do not read
    home_broker: str = ""  # the home's own broker (home.py), when one is configured
    # Paired LAN peers this gateway forwards to when saturated (peers.py): id -> "ready" or
    # "connecting"; and the jobs of ours in flight there.
    peers: dict[str, str] = {}
    peer_jobs_in_flight: int = 0
    home_broker_state: str = ""  # connected, connecting, disconnected: ..., refused: ...
    started_at: float
    updated_at: float


def write_snapshot(state_dir: Path, snapshot: StatusSnapshot) -> None:
    """Atomically (a new file, renamed). On a full disk there is no room for the new file: the
    old one is overwritten in place instead, which needs no new blocks as long as the text
    fits in its size; that is why the text is padded (with spaces, which JSON ignores) to
    whole pages. A reader may then catch a torn file: read_snapshot tries again."""
    data = msgspec.json.format(msgspec.json.encode(snapshot))
    data += b" " * (-len(data) % _PAGE)
    tmp = state_dir / f".{_FILE}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, state_dir / _FILE)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        path = state_dir / _FILE
        if not path.exists() or path.stat().st_size < len(data):
            raise
        with path.open("r+b") as f:
            f.write(data.ljust(path.stat().st_size))


def read_snapshot(state_dir: Path) -> StatusSnapshot | None:
    for _attempt in range(3):  # a torn in-place write (see write_snapshot) is retried
        try:
            snapshot = msgspec.json.decode((state_dir / _FILE).read_bytes(), type=StatusSnapshot)
            break
        except OSError:
            return None
        except msgspec.DecodeError:
            time.sleep(0.05)
    else:
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
        f"mDNS        {_mdns(s)}",
        *(f"listener    {kind}: {where}" for kind, where in s.listeners.items()),
        f"devices     {s.paired_devices} paired",
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
        *_storage_lines(s),
        *_journal_lines(s.journal),
        f"tasks       {s.tasks} persistent tasks (hearth-gateway tasks list)",
        f"vision      {', '.join(s.capabilities) or '-'}",
        f"streams     {s.streams} streams, {s.frames_dropped} frames dropped (latest frame "
        f"wins), {s.sessions} open sessions",
        f"tier        {s.tier}" + (" (private jobs refused)" if s.tier == "cloud" else ""),
    ]
    if s.managed_broker:
        lines.append(
            f"dropped     {s.broker_dropped} messages the broker dropped for clients that do "
            "not read (per-client queue full; since the broker started)"
        )
    if s.upstream:
        lines.append(
            f"upstream    {s.upstream} ({'connected' if s.upstream_connected else 'not connected'}"
            f"): {s.jobs_forwarded} public jobs forwarded, {s.jobs_fell_back} ran here instead"
        )
    if s.peers:
        listed = ", ".join(f"{p} ({state})" for p, state in sorted(s.peers.items()))
        lines.append(f"peers       {listed}; {s.peer_jobs_in_flight} jobs of ours there now")
    if s.home_broker:
        lines.append(f"home broker {s.home_broker}: {s.home_broker_state}")
    return "\n".join(lines)


def _mdns(s: StatusSnapshot) -> str:
    if not s.mdns:
        return "off"
    return f"advertising _hearth._tcp as {s.mdns_name!r}" if s.mdns_name else "advertising"


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


def _storage_lines(s: StatusSnapshot) -> list[str]:
    if not s.storage_total_bytes:  # a snapshot from before storage was reported
        return []
    state = "ok"
    if s.storage_full:
        state = "FULL: uploads, jobs and task installs refused (storage_full)"
    return [
        f"storage     {state}; {_size(s.storage_free_bytes)} free of "
        f"{_size(s.storage_total_bytes)}, {_size(s.storage_reserve_bytes)} kept in reserve; "
        f"{s.storage_refused} requests refused for space (since start)"
    ]


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
