"""Per-device and per-application quotas (policy ``[quotas]``, docs/quotas.md): the one place
that decides whether a device's application may start one more job, store one more blob or
install one more task, and that accounts what each used.

What is counted, per device and per application (a job's ``app``, by default its device's id):

- ``cpu_s_per_day``: the run time of its jobs on this gateway's workers (the ``run_ms`` of
  their answers), per UTC day; resets at the next UTC midnight.
- ``concurrent_jobs``: its jobs queued or running now.
- ``stored_bytes``: the blobs (modules, models, snapshots) it uploaded that are still stored.
- ``tasks``: its persistent tasks still installed.

A device's limits cover all its applications together; an application's cover that
application on one device, so one noisy application does not starve the device's others.
Usage is kept in the store (SQLite), so a restart does not hand out a fresh day. Used from
the daemon's loop thread only.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec

from hearth.errors import ErrorCode
from hearth.protocol import AppUsage, Error, Timing
from hearth_gateway.policy import QuotaLimits, QuotasPolicy
from hearth_gateway.store import STORED_SQL, TASK_APPS_SQL, USAGE_SQL, Store

__all__ = [
    "QuotaRefusal",
    "Quotas",
    "UsageFile",
    "app_of",
    "next_reset",
    "run_seconds",
    "usage_rows",
    "utc_day",
]


Key = tuple[str, str]  # (client_id, app)


def app_of(client_id: str, app: object) -> str:
    """The application a message is for: its ``app``, or its device's id when it names none."""
    return app if isinstance(app, str) and app else client_id


def utc_day(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d")


def next_reset(at: float) -> float:
    """The next UTC midnight after ``at`` (unix seconds): when the day's CPU-seconds reset."""
    day = dt.datetime.fromtimestamp(at, dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (day + dt.timedelta(days=1)).timestamp()


@dataclass(frozen=True)
class QuotaRefusal:
    """A quota that refuses: which one, whose, and when it resets (None: when usage falls)."""

    quota: str
    message: str
    resets_at: float | None

    def error(self, job_id: str | None = None) -> Error:
        resets = msgspec.UNSET if self.resets_at is None else self.resets_at
        return Error(
            code=ErrorCode.QUOTA_EXCEEDED,
            message=self.message,
            job_id=job_id,
            quota=self.quota,
            resets_at=resets,
        )


class _TimingOnly(msgspec.Struct):
    """The one field of an answer that accounting reads (the rest is skipped, not decoded)."""

    timing: Timing | None = None


_timing_decoder = msgspec.msgpack.Decoder(_TimingOnly)


def run_seconds(reply: bytes) -> float:
    """The run time an answer reports (0 for an error, or an answer without timing)."""
    try:
        timing = _timing_decoder.decode(reply).timing
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0.0
    if timing is None or timing.upstream:  # run elsewhere: not this gateway's CPU
        return 0.0
    return max(0.0, timing.run_ms) / 1e3


class Quotas:
    def __init__(
        self, policy: QuotasPolicy, store: Store, clock: Callable[[], float] = time.time
    ) -> None:
        self._policy = policy
        self._store = store
        self._clock = clock
        self._running: Counter[Key] = Counter()
        self._day = utc_day(clock())
        self._day_ends = next_reset(clock())  # the day is looked up again only after this
        # Today's CPU-seconds, from the store (a restart keeps them).
        self._cpu: dict[Key, float] = {}
        self._load_day()
        # Run time not written yet: the loop turn's, written together at its end (flush).
        self._pending: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._enabled = self.enabled

    @property
    def enabled(self) -> bool:
        p = self._policy
        return bool(p.devices or p.apps) or p.device != QuotaLimits() or p.app != QuotaLimits()

    def _load_day(self) -> None:
        self._cpu = {(c, a): s for c, a, s, _ in self._store.usage(self._day)}

    def _today(self) -> None:
        now = self._clock()
        if self._day_ends - 86400.0 <= now < self._day_ends:  # still the day we know
            return
        self._day_ends = next_reset(now)
        day = utc_day(now)
        if day != self._day:
            self._day = day
            self._load_day()

    def limits(self, client_id: str, app: str) -> tuple[QuotaLimits, QuotaLimits]:
        """(the device's limits, the application's) for this device's application."""
        p = self._policy
        device = p.devices.get(client_id, p.device).over(p.device)
        application = p.apps.get(app, p.app).over(p.app)
        return device, application

    # -- jobs ------------------------------------------------------------------------------

    def job_refusal(self, client_id: str, app: str) -> QuotaRefusal | None:
        """Why this device's application may not start a job now, or None."""
        if not self._enabled:
            return None
        self._today()
        device, application = self.limits(client_id, app)
        cpu_device = sum(s for (c, _), s in self._cpu.items() if c == client_id)
        cpu_app = self._cpu.get((client_id, app), 0.0)
        running_device = sum(n for (c, _), n in self._running.items() if c == client_id)
        running_app = self._running[(client_id, app)]
        resets = next_reset(self._clock())
        checks = (
            ("cpu_s_per_day", None, device.cpu_s_per_day, cpu_device, resets),
            ("cpu_s_per_day", app, application.cpu_s_per_day, cpu_app, resets),
            ("concurrent_jobs", None, device.concurrent_jobs, running_device, None),
            ("concurrent_jobs", app, application.concurrent_jobs, running_app, None),
        )
        for quota, whose, limit, used, resets_at in checks:
            if limit is not None and used >= limit:
                return _refusal(
                    quota,
                    client_id=client_id,
                    app=whose,
                    used=used,
                    limit=limit,
                    resets_at=resets_at,
                )
        return None

    def started(self, client_id: str, app: str) -> None:
        self._running[(client_id, app)] += 1

    def ended(self, client_id: str, app: str, seconds: float) -> None:
        """A job admitted with ``started`` answered: its slot is free, its run time counted."""
        key = (client_id, app)
        self._running[key] -= 1
        if self._running[key] <= 0:
            del self._running[key]
        if seconds <= 0:
            return
        self._today()
        self._cpu[key] = self._cpu.get(key, 0.0) + seconds
        row = (self._day, client_id, app)
        cpu_s, jobs = self._pending.get(row, (0.0, 0))
        self._pending[row] = (cpu_s + seconds, jobs + 1)

    def flush(self) -> None:
        """Hand the run time accounted since the last flush to the store, which writes it in
        the journal's commit at the end of this turn (and keeps it for the next one if the
        disk refuses it)."""
        if not self._pending:
            return
        rows = [(*row, cpu_s, jobs) for row, (cpu_s, jobs) in self._pending.items()]
        self._store.add_usage(rows)
        self._pending.clear()

    # -- stored bytes and tasks ------------------------------------------------------------

    def store_refusal(self, client_id: str, app: str, size: int) -> QuotaRefusal | None:
        """Why this device's application may not store ``size`` more bytes, or None."""
        device, application = self.limits(client_id, app)
        if device.stored_bytes is None and application.stored_bytes is None:
            return None
        held = self._store.stored_bytes()
        used_device = sum(n for c, _, n in held if c == client_id)
        used_app = sum(n for c, a, n in held if (c, a) == (client_id, app))
        for whose, limit, used in (
            (None, device.stored_bytes, used_device),
            (app, application.stored_bytes, used_app),
        ):
            if limit is not None and used + size > limit:
                return _refusal(
                    "stored_bytes",
                    client_id=client_id,
                    app=whose,
                    used=used + size,
                    limit=limit,
                    resets_at=None,
                )
        return None

    def stored(self, sha256: str, client_id: str, app: str, size: int) -> None:
        self._store.add_blob_owner(sha256, client_id, app, size)

    def task_refusal(self, client_id: str, app: str) -> QuotaRefusal | None:
        device, application = self.limits(client_id, app)
        if device.tasks is None and application.tasks is None:
            return None
        owners = list(self._store.task_apps().values())
        for whose, limit, used in (
            (None, device.tasks, sum(1 for c, _ in owners if c == client_id)),
            (app, application.tasks, owners.count((client_id, app))),
        ):
            if limit is not None and used >= limit:
                return _refusal(
                    "tasks", client_id=client_id, app=whose, used=used, limit=limit, resets_at=None
                )
        return None

    def installed(self, task_id: str, client_id: str, app: str) -> None:
        self._store.set_task_app(task_id, client_id, app)

    # -- reporting -------------------------------------------------------------------------

    def usage(self, client_id: str | None = None) -> list[AppUsage]:
        """Today's usage of every device (or of one)."""
        self._today()
        rows = usage_rows(self._store, self._day)
        return [r for r in rows if client_id is None or r.client_id == client_id]


class UsageSource(Protocol):
    """Where usage is read from: the daemon's Store, or the file opened read-only."""

    def usage(self, day: str) -> list[tuple[str, str, float, int]]: ...
    def stored_bytes(self) -> list[tuple[str, str, int]]: ...
    def task_apps(self) -> dict[str, tuple[str, str]]: ...


class UsageFile:
    """The gateway's SQLite file, read-only (``hearth-gateway usage``: the daemon may run)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def _rows(self, sql: str, *params: str) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.OperationalError:  # written by a gateway from before quotas
            return []

    def usage(self, day: str) -> list[tuple[str, str, float, int]]:
        return [(str(c), str(a), float(s), int(j)) for c, a, s, j in self._rows(USAGE_SQL, day)]

    def stored_bytes(self) -> list[tuple[str, str, int]]:
        return [(str(c), str(a), int(n)) for c, a, n in self._rows(STORED_SQL)]

    def task_apps(self) -> dict[str, tuple[str, str]]:
        return {str(t): (str(c), str(a)) for t, c, a in self._rows(TASK_APPS_SQL)}

    def close(self) -> None:
        self._db.close()


def usage_rows(source: UsageSource, day: str) -> list[AppUsage]:
    """Every device's applications with any usage: the day's run time, what they hold."""
    rows: dict[Key, dict[str, float | int]] = {}
    for client_id, app, cpu_s, jobs in source.usage(day):
        rows.setdefault((client_id, app), {})
        rows[(client_id, app)].update(cpu_s=cpu_s, jobs=jobs)
    for client_id, app, size in source.stored_bytes():
        rows.setdefault((client_id, app), {})["stored_bytes"] = size
    for key in source.task_apps().values():
        entry = rows.setdefault(key, {})
        entry["tasks"] = int(entry.get("tasks", 0)) + 1
    return [
        AppUsage(
            client_id=client_id,
            app=app,
            day=day,
            cpu_s=round(float(v.get("cpu_s", 0.0)), 6),
            jobs=int(v.get("jobs", 0)),
            stored_bytes=int(v.get("stored_bytes", 0)),
            tasks=int(v.get("tasks", 0)),
        )
        for (client_id, app), v in sorted(rows.items())
    ]


def _refusal(
    quota: str,
    *,
    client_id: str,
    app: str | None,
    used: float,
    limit: float,
    resets_at: float | None,
) -> QuotaRefusal:
    """``app`` None: the device's own quota (all its applications)."""
    whose = f"device {client_id}" if app is None else f"application {app} on device {client_id}"
    when = (
        f"resets at {dt.datetime.fromtimestamp(resets_at, dt.UTC):%Y-%m-%d %H:%M:%S} UTC"
        if resets_at is not None
        else "frees up as its usage falls"
    )
    message = f"quota {quota} of {whose} exceeded: {used:.6g} of {limit:g} used; {when}"
    return QuotaRefusal(quota, message, resets_at)
