"""The daemon's metrics (Prometheus/OpenMetrics, ``/metrics`` on the web listener) and the
recent activity the owner's page shows (jobs in flight and recent, task log lines, a short
history of load and latency for the charts).

Threads: the daemon's loop thread is the only writer. Hooks (``job_placed``, ``job_finished``,
``refused``...) are called from it and do nothing but bump counters and append to bounded
deques. The web listener's thread (web/) only reads: prometheus_client's metric objects take
their own lock on every update and read, and the activity kept here for the page sits behind
``self._lock``; so the HTTP side never touches the store, the pool or the link, which belong to
the loop. What costs a query (blob totals, journal size, task states) is read by the loop in its
housekeeping, every 2 s, and set here as gauges (``observe``): a scrape sees values at most one
housekeeping period old, which is well inside any Prometheus scrape interval.

One ``CollectorRegistry`` per daemon, never the process-global one: two gateways in one process
(tests) must not share or collide on counters.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics import MetricWrapperBase

__all__ = ["JobRecord", "Metrics", "StateSample"]

# Latency buckets (s): a WASM filter is a few ms, an ONNX model tens, a vision call or a cold
# compile up to seconds.
_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_RECENT_JOBS = 200  # finished jobs the page lists
_TASK_LOG_LINES = 50  # per task
_MAX_TASK_LOGS = 256  # tasks with log lines kept (the oldest go first)
_SERIES = 180  # housekeeping samples for the charts: 6 minutes at one per 2 s
_DIGITS = re.compile(r"\d+(\.\d+)?")


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job as the owner's page shows it."""

    client_id: str
    job_id: str
    runner: str
    where: str  # here | queue | upstream
    why: str  # placement's reason
    accepted_at: float  # unix seconds
    outcome: str = ""  # ok, or the error code; "" while in flight
    total_s: float | None = None


@dataclass(frozen=True, slots=True)
class StateSample:
    """What the loop reads in its housekeeping, for gauges and charts."""

    online: bool = False
    broker_connected: bool = False
    upstream_connected: bool = False
    workers: int = 0
    busy_workers: int = 0
    queue_depth: int = 0
    worker_restarts: int = 0
    workers_recycled: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    journal_bytes: int = 0
    journal_file_bytes: int = 0
    audit_rows: int = 0
    paired_devices: int = 0
    storage_free_bytes: int = 0
    tasks: dict[str, int] = field(default_factory=dict)  # state -> count
    at: float = 0.0


class _Outcome(msgspec.Struct):
    """Just enough of an encoded reply to tell an answer from an error."""

    type: str = ""
    code: str = ""


_outcome = msgspec.msgpack.Decoder(_Outcome)


def outcome_of(reply: bytes) -> str:
    """``ok``, or the protocol's error code for an ``error`` reply."""
    try:
        decoded = _outcome.decode(reply)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "unreadable"
    if decoded.type == "error":
        return decoded.code or "error"
    return "ok"


@functools.lru_cache(maxsize=1024)  # reasons repeat: the regular expressions run once each
def reason_label(reason: str) -> str:
    """Placement's reason with its figures taken out, as a label of bounded cardinality:
    "public; 3 jobs ahead, 2/2 workers busy" -> "public"."""
    head = re.split(r";| \(", reason, maxsplit=1)[0]
    return _DIGITS.sub("N", head).strip()[:80]


class Metrics:
    """Counters, histograms and gauges of one daemon, and the activity the page lists."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter(
            "hearth_jobs", "Jobs answered, by runner and outcome", ["runner", "outcome"], registry=r
        )
        self.queue_s = Histogram(
            "hearth_job_queue_seconds",
            "Time from acceptance to a worker taking the job",
            ["runner"],
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.run_s = Histogram(
            "hearth_job_run_seconds",
            "Time a worker spent on the job",
            ["runner"],
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.total_s = Histogram(
            "hearth_job_total_seconds",
            "Time from acceptance to the answer",
            ["runner"],
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.bytes_in = Counter(
            "hearth_received_bytes", "MQTT payload bytes the gateway received", registry=r
        )
        self.bytes_out = Counter(
            "hearth_sent_bytes", "MQTT payload bytes the gateway published", registry=r
        )
        self.refusals = Counter(
            "hearth_refusals", "Requests refused, by error code", ["code"], registry=r
        )
        self.placements = Counter(
            "hearth_placement_decisions",
            "Placement decisions, by target and reason (figures taken out)",
            ["target", "reason"],
            registry=r,
        )
        self.task_events = Counter(
            "hearth_task_events",
            "Persistent tasks' events, by outcome (ok, failed, dropped)",
            ["outcome"],
            registry=r,
        )
        self.task_actions = Counter(
            "hearth_task_actions",
            "Actions tasks asked for, by kind (publish, refused, notify, log)",
            ["kind"],
            registry=r,
        )
        self.frames_dropped = Counter(
            "hearth_frames_dropped",
            "Stream frames replaced by a newer one (latest frame wins), per stream",
            ["stream"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "hearth_worker_restarts", "Workers replaced after a crash or an overrun", registry=r
        )
        self.workers_recycled = Counter(
            "hearth_workers_recycled",
            "Workers replaced between jobs for their memory or job count",
            registry=r,
        )
        self._gauges = {
            name: Gauge(f"hearth_{name}", doc, registry=r)
            for name, doc in (
                ("up", "1 while the gateway serves"),
                ("broker_connected", "1 while the gateway's MQTT link is connected"),
                ("upstream_connected", "1 while the upstream gateway is reachable and online"),
                ("workers", "Worker processes"),
                ("workers_busy", "Workers running a job"),
                ("queue_depth", "Jobs admitted and not yet answered"),
                ("blobs", "Stored blobs (modules, models)"),
                ("blob_bytes", "Bytes of stored blobs"),
                ("journal_bytes", "Bytes of the job journal (requests and kept answers)"),
                ("state_file_bytes", "Bytes of the state database and its WAL"),
                ("audit_rows", "Rows in the audit table"),
                ("paired_devices", "Devices with a valid pairing"),
                ("storage_free_bytes", "Free bytes in the state directory's file system"),
            )
        }
        self.tasks = Gauge("hearth_tasks", "Persistent tasks, by state", ["state"], registry=r)
        self._lock = threading.Lock()  # guards everything below (read by the web thread)
        self._in_flight: dict[tuple[str, str], JobRecord] = {}
        self._recent: deque[JobRecord] = deque(maxlen=_RECENT_JOBS)
        self._task_logs: dict[str, deque[tuple[float, str]]] = {}
        self._series: deque[tuple[float, float, float, float]] = deque(maxlen=_SERIES)
        self._window: list[float] = []  # total latencies (s) since the last sample
        self._sample = StateSample()
        self._seen_restarts = 0
        self._seen_recycled = 0
        # prometheus-client's labels() checks and looks up its arguments on every call: the
        # children of the per-job metrics are kept here instead (loop thread only).
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- hooks, called on the loop thread --------------------------------------------------------

    def received(self, size: int) -> None:
        self.bytes_in.inc(size)

    def sent(self, size: int) -> None:
        self.bytes_out.inc(size)

    def refused(self, code: str) -> None:
        self.refusals.labels(code=code).inc()

    def placed(self, target: str, reason: str) -> None:
        self._child(self.placements, target, reason_label(reason)).inc()

    def frame_dropped(self, stream: str) -> None:
        self.frames_dropped.labels(stream=stream).inc()

    def job_accepted(self, record: JobRecord) -> None:
        with self._lock:
            self._in_flight[(record.client_id, record.job_id)] = record

    def job_finished(
        self,
        client_id: str,
        job_id: str,
        runner: str,
        reply: bytes,
        timing: tuple[float, float, float] | None,
    ) -> None:
        """``timing``: (enqueued, started, now) on the monotonic clock; None for a job that
        ran elsewhere (forwarded upstream)."""
        outcome = outcome_of(reply)
        self._child(self.jobs, runner, outcome).inc()
        total = None
        if timing is not None:
            enqueued, started, now = timing
            started = started or now  # never started (refused in the worker): all queue
            self._child(self.queue_s, runner).observe(max(0.0, started - enqueued))
            self._child(self.run_s, runner).observe(max(0.0, now - started))
            total = max(0.0, now - enqueued)
            self._child(self.total_s, runner).observe(total)
        with self._lock:
            record = self._in_flight.pop((client_id, job_id), None)
            if total is not None:
                self._window.append(total)
            if record is not None:
                self._recent.append(replace(record, outcome=outcome, total_s=total))

    def task_event(self, outcome: str, count: int = 1) -> None:
        if count:
            self.task_events.labels(outcome=outcome).inc(count)

    def task_action(self, task_id: str, kind: str, text: str = "") -> None:
        """An action a task asked for; notes and log lines are kept for the page."""
        self.task_actions.labels(kind=kind).inc()
        if kind in ("log", "notify"):
            self.task_log(task_id, text if kind == "log" else f"notify: {text}")

    def task_log(self, task_id: str, line: str) -> None:
        with self._lock:
            lines = self._task_logs.get(task_id)
            if lines is None:
                if len(self._task_logs) >= _MAX_TASK_LOGS:
                    del self._task_logs[next(iter(self._task_logs))]
                lines = self._task_logs[task_id] = deque(maxlen=_TASK_LOG_LINES)
            lines.append((time.time(), line[:500]))

    def observe(self, sample: StateSample) -> None:
        """The loop's housekeeping reading: gauges, the counters kept by the pool, and one
        point of the charts (load, and the median and worst latency since the last point)."""
        g = self._gauges
        g["up"].set(1 if sample.online else 0)
        g["broker_connected"].set(1 if sample.broker_connected else 0)
        g["upstream_connected"].set(1 if sample.upstream_connected else 0)
        g["workers"].set(sample.workers)
        g["workers_busy"].set(sample.busy_workers)
        g["queue_depth"].set(sample.queue_depth)
        g["blobs"].set(sample.blobs)
        g["blob_bytes"].set(sample.blob_bytes)
        g["journal_bytes"].set(sample.journal_bytes)
        g["state_file_bytes"].set(sample.journal_file_bytes)
        g["audit_rows"].set(sample.audit_rows)
        g["paired_devices"].set(sample.paired_devices)
        g["storage_free_bytes"].set(sample.storage_free_bytes)
        for state in ("running", "paused", "suspended", *sample.tasks):
            self.tasks.labels(state=state).set(sample.tasks.get(state, 0))
        # The pool counts these itself; the counters follow by the difference.
        self.worker_restarts.inc(max(0, sample.worker_restarts - self._seen_restarts))
        self.workers_recycled.inc(max(0, sample.workers_recycled - self._seen_recycled))
        self._seen_restarts = sample.worker_restarts
        self._seen_recycled = sample.workers_recycled
        load = sample.queue_depth / max(1, sample.workers)
        with self._lock:
            window = sorted(self._window)
            self._window.clear()
            p50 = window[len(window) // 2] if window else 0.0
            worst = window[-1] if window else 0.0
            self._series.append((sample.at, load, p50 * 1e3, worst * 1e3))
            self._sample = sample

    # -- reads, from any thread ----------------------------------------------------------------

    def exposition(self) -> bytes:
        """The Prometheus text format of this daemon's registry."""
        return generate_latest(self.registry)

    def jobs_in_flight(self) -> list[JobRecord]:
        with self._lock:
            return sorted(self._in_flight.values(), key=lambda j: j.accepted_at, reverse=True)

    def jobs_recent(self) -> list[JobRecord]:
        with self._lock:
            return list(reversed(self._recent))

    def task_lines(self, task_id: str) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._task_logs.get(task_id, ()))

    def series(self) -> list[tuple[float, float, float, float]]:
        """(unix time, load, p50 ms, max ms) per housekeeping turn, oldest first."""
        with self._lock:
            return list(self._series)

    def state(self) -> StateSample:
        with self._lock:
            return self._sample
