"""Does the journal stay within its bounds under 1 MiB jobs? (10 per second for 10 minutes, or the
same volume as fast as the gateway takes it.)

One run, all on 127.0.0.1: one Mosquitto (the gateway's own config) and, per phase, a fresh
``hearth-gateway`` subprocess (2 workers) with a policy of small bounds, so that they are
reached many times over: ``limits.journal_bytes`` 64 MiB, ``limits.audit_bytes`` 512 KiB. Each
phase sends N jobs (default 6000: 10 minutes at 10 per second) of ``echo.wasm`` with a 1 MiB
stdin, K in flight, through ``hearth.Client``; each answer carries the stdin back (1 MiB too)
and is checked.

- phase ``whole``: ``journal_inline_bytes`` 2 MiB, so requests wait in the database and every
  answer is kept whole: the byte bound evicts the oldest ones all the time;
- phase ``not-kept``: the default ``journal_inline_bytes`` (64 KiB), so requests wait in files
  of their own and 1 MiB answers are not kept: the journal holds little but the requests in
  flight. Then a few job ids are sent again: they run again and must answer the same.

The sizes of the database file and its WAL are read every 0.5 s; every 5 s (and at the end) the
database is also read from here, read-only, with SQLite's dbstat: the pages the journal (the jobs
table and its indexes, with the request files in flight) and the audit table take. The maxima are
compared with the bounds. The file's bound is the two plus the free pages the gateway keeps for
reuse (8 MiB) and the small tables; the WAL is truncated back to 8 MiB after each checkpoint, but
grows past that while a checkpoint waits (for dbstat's read here, say): its bound is 16 MiB. The
gateway's own estimates (``hearth-gateway status``) are reported too.

    .venv/bin/python benchmarks/journal.py                     # table
    .venv/bin/python benchmarks/journal.py --json              # one JSON line on stdout
    .venv/bin/python benchmarks/journal.py --jobs 1000 --phase whole
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    GatewayProcess,
    Mosquitto,
    ensure_examples,
    print_table,
    run_and_report,
    setup_logging,
    verdict,
)
from hearth import Client, WasmRun
from hearth_gateway.status import read_snapshot

log = logging.getLogger("bench.journal")

KiB = 1024
MiB = 1024 * KiB
JOB_BYTES = MiB
DEFAULT_JOBS = 6000  # 10 minutes at 10 jobs per second
DEFAULT_INFLIGHT = 8
JOURNAL_BYTES = 64 * MiB
AUDIT_BYTES = 512 * KiB
FREE_SLACK_BYTES = 8 * MiB  # free pages the gateway keeps for reuse (store.py)
SMALL_TABLES_BYTES = 256 * KiB  # tasks, blobs, devices, schema: a page or two each
WAL_BOUND_BYTES = 16 * MiB
RESENT = 5  # job ids sent again at the end of the not-kept phase
SIZES_S = 0.5  # file sizes read this often
TABLES_EVERY = 10  # ... and dbstat every this many of those
PHASES = {"whole": 2 * MiB, "not-kept": 64 * KiB}  # phase -> journal_inline_bytes
JOURNAL_TABLES = {"jobs"}
AUDIT_TABLES = {"audit"}

Figures = dict[str, Any]


@dataclass
class DiskSample:
    journal: int = 0  # pages of the jobs table and its indexes
    audit: int = 0
    file: int = 0  # the database file
    wal: int = 0


@dataclass
class PhaseResult:
    name: str
    inline_bytes: int
    jobs: int = 0
    wrong: int = 0  # answers that did not carry the stdin back
    seconds: float = 0.0
    max: DiskSample = field(default_factory=DiskSample)
    last: DiskSample = field(default_factory=DiskSample)
    samples: int = 0
    gateway: Figures = field(default_factory=dict)  # its own estimates, from the snapshot
    resent_ok: int = 0


@dataclass
class Outcome:
    figures: Figures
    phases: list[PhaseResult]
    inflight: int


def measure_tables(db: Path, sample: DiskSample) -> None:
    """What the journal and the audit table take on disk, read-only, while the gateway runs."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        owner = dict(conn.execute("SELECT name, tbl_name FROM sqlite_schema WHERE rootpage > 0"))
        sample.journal = sample.audit = 0
        for name, size in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            table = owner.get(name, name)
            if table in JOURNAL_TABLES:
                sample.journal += int(size)
            elif table in AUDIT_TABLES:
                sample.audit += int(size)
    finally:
        conn.close()
    for file in (db.parent / "requests").iterdir():
        with contextlib.suppress(FileNotFoundError):  # answered meanwhile
            sample.journal += file.stat().st_blocks * 512


def measure_files(db: Path, sample: DiskSample) -> None:
    sample.file = _size(db)
    sample.wal = _size(Path(f"{db}-wal"))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # no WAL between a checkpoint and the next write
        return 0


class Sampler:
    """Samples the database on a thread of its own; keeps the maxima."""

    def __init__(self, db: Path, result: PhaseResult) -> None:
        self._db = db
        self._result = result
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        count = 0
        while not self._stop.wait(SIZES_S):
            count += 1
            self.sample(tables=count % TABLES_EVERY == 0)

    def sample(self, *, tables: bool) -> None:
        now = self._result.last
        measure_files(self._db, now)
        if tables:
            try:
                measure_tables(self._db, now)
            except sqlite3.Error as exc:  # busy for a moment: the next sample will do
                log.debug("sample skipped: %s", exc)
            else:
                self._result.samples += 1
        top = self._result.max
        top.journal = max(top.journal, now.journal)
        top.audit = max(top.audit, now.audit)
        top.file = max(top.file, now.file)
        top.wal = max(top.wal, now.wal)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample(tables=True)


def stdin_for(base: bytes, index: int) -> bytes:
    """A distinct 1 MiB stdin per job, cheaply: random bytes with the job's number in front."""
    return index.to_bytes(8, "big") + base[8:]


def run_phase(
    name: str, broker: Mosquitto, work: Path, opts: argparse.Namespace, module: Path
) -> PhaseResult:
    result = PhaseResult(name, PHASES[name])
    work.mkdir()
    policy = work / "policy.toml"
    policy.write_text(
        "[limits]\n"
        f"journal_bytes = {opts.journal_bytes}\n"
        f"audit_bytes = {opts.audit_bytes}\n"
        f"journal_inline_bytes = {result.inline_bytes}\n"
    )
    base = os.urandom(JOB_BYTES)
    with GatewayProcess(
        broker.address, work, workers=2, extra_args=["--policy", str(policy)]
    ) as gateway:
        db = gateway.state_dir / "hearth.sqlite3"
        sampler = Sampler(db, result)
        sampler.start()
        started = time.monotonic()
        try:
            with Client(
                gateway=str(broker.address),
                placement="edge",
                timeout_s=120.0,
                max_workers=opts.inflight,
            ) as client:
                result.wrong += send(client, module, base, range(opts.jobs), opts.inflight)
                result.seconds = time.monotonic() - started
                result.jobs = opts.jobs
                if name == "not-kept":
                    # Their answers were not kept: sent again, they run again, answer the same.
                    again = range(opts.jobs - RESENT, opts.jobs)
                    result.resent_ok = RESENT - send(client, module, base, again, opts.inflight)
        finally:
            sampler.close()
        time.sleep(2.5)  # one more status snapshot from the gateway
        snapshot = read_snapshot(gateway.state_dir)
        if snapshot is not None and snapshot.journal is not None:
            j = snapshot.journal
            result.gateway = {
                "journal_bytes": j.journal_bytes,
                "audit_bytes": j.audit_bytes,
                "audit_rows": j.audit_rows,
                "answers": j.answers,
                "evicted": j.evicted,
                "unkept": j.unkept,
                "file_bytes": j.file_bytes,
            }
    log.info("phase %s: %d jobs in %.0f s", name, result.jobs, result.seconds)
    return result


def send(client: Client, module: Path, base: bytes, indexes: range, inflight: int) -> int:
    """Run one job per index, ``inflight`` at a time; returns how many answered wrongly."""
    wrong = 0
    pending: list[tuple[int, Future[WasmRun]]] = []
    for index in indexes:
        stdin = stdin_for(base, index)
        pending.append(
            (index, client.run_wasm_async(module, stdin=stdin, job_id=f"job-{index:06d}"))
        )
        if len(pending) >= inflight:
            wrong += check(base, *pending.pop(0))
        if index and index % 500 == 0:
            log.info("%d jobs sent", index)
    for item in pending:
        wrong += check(base, *item)
    return wrong


def check(base: bytes, index: int, future: Future[WasmRun]) -> int:
    run = future.result()
    return 0 if run.where == "edge" and run.stdout == stdin_for(base, index) else 1


def file_bound(opts: argparse.Namespace) -> int:
    return opts.journal_bytes + opts.audit_bytes + FREE_SLACK_BYTES + SMALL_TABLES_BYTES


def run(opts: argparse.Namespace, tmp: Path) -> Outcome:
    module = ensure_examples("wasm/echo.wasm") / "wasm" / "echo.wasm"
    phases: list[PhaseResult] = []
    with Mosquitto(tmp, max_packet_bytes=4 * MiB) as broker:
        for name in opts.phase:
            phases.append(run_phase(name, broker, tmp / name, opts, module))
    figures: Figures = {
        "jobs_per_phase": opts.jobs,
        "job_bytes": JOB_BYTES,
        "inflight": opts.inflight,
        "journal_bound_bytes": opts.journal_bytes,
        "audit_bound_bytes": opts.audit_bytes,
        "file_bound_bytes": file_bound(opts),
        "wal_bound_bytes": WAL_BOUND_BYTES,
    }
    for p in phases:
        key = p.name.replace("-", "_")
        within = (
            p.max.journal <= opts.journal_bytes
            and p.max.audit <= opts.audit_bytes
            and p.max.file <= file_bound(opts)
            and p.max.wal <= WAL_BOUND_BYTES
        )
        figures.update(
            {
                f"{key}_inline_bytes": p.inline_bytes,
                f"{key}_jobs": p.jobs,
                f"{key}_wrong_answers": p.wrong,
                f"{key}_jobs_per_s": p.jobs / p.seconds if p.seconds else 0.0,
                f"{key}_equivalent_minutes_at_10_per_s": p.jobs / 10 / 60,
                f"{key}_journal_disk_max_bytes": p.max.journal,
                f"{key}_audit_disk_max_bytes": p.max.audit,
                f"{key}_file_max_bytes": p.max.file,
                f"{key}_wal_max_bytes": p.max.wal,
                f"{key}_journal_disk_end_bytes": p.last.journal,
                f"{key}_audit_disk_end_bytes": p.last.audit,
                f"{key}_samples": p.samples,
                f"{key}_within_bounds": within and p.wrong == 0,
                **{f"{key}_gateway_{k}": v for k, v in p.gateway.items()},
            }
        )
        if p.name == "not-kept":
            figures[f"{key}_resent_ok"] = p.resent_ok
    return Outcome(figures, phases, opts.inflight)


def print_report(outcome: Outcome) -> None:
    f = outcome.figures
    rows: list[list[object]] = []
    for p in outcome.phases:
        rate = p.jobs / p.seconds if p.seconds else 0.0
        rows.append(
            [
                p.name,
                p.jobs,
                round(rate, 1),
                mib(p.max.journal),
                mib(p.max.audit),
                mib(p.max.file),
                mib(p.max.wal),
                p.gateway.get("answers", "-"),
                p.gateway.get("evicted", "-"),
                p.gateway.get("unkept", "-"),
                p.gateway.get("audit_rows", "-"),
                p.wrong,
            ]
        )
    print_table(
        [
            "phase",
            "jobs",
            "jobs/s",
            "journal MiB (max)",
            "audit MiB (max)",
            "file MiB (max)",
            "WAL MiB (max)",
            "answers kept",
            "evicted",
            "not kept",
            "audit rows",
            "wrong",
        ],
        rows,
        title=f"1 MiB echo jobs, {outcome.inflight} in flight; on disk (tables by dbstat), "
        "maxima while they ran; answers kept, evicted, not kept: the gateway's own counts",
    )
    targets: list[list[object]] = []
    for p in outcome.phases:
        for what, value, bound in (
            ("journal", p.max.journal, int(f["journal_bound_bytes"])),
            ("audit", p.max.audit, int(f["audit_bound_bytes"])),
            ("file", p.max.file, int(f["file_bound_bytes"])),
            ("WAL", p.max.wal, int(f["wal_bound_bytes"])),
        ):
            targets.append(
                [f"{p.name}: {what} MiB", mib(value), f"<= {mib(bound):.1f}",
                 verdict(value, bound, at_most=True)]
            )  # fmt: skip
        targets.append(
            [f"{p.name}: answers that came back wrong", p.wrong, "= 0",
             "PASS" if p.wrong == 0 else "MISS"]
        )  # fmt: skip
        if p.name == "not-kept":
            targets.append(
                [f"{p.name}: ids sent again answered again", p.resent_ok, f"= {RESENT}",
                 "PASS" if p.resent_ok == RESENT else "MISS"]
            )  # fmt: skip
    print_table(["figure", "value", "bound", "verdict"], targets, title="Bounds")


def mib(value: float) -> float:
    return value / MiB


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument(
        "--jobs", type=int, default=DEFAULT_JOBS, help=f"jobs per phase (default {DEFAULT_JOBS})"
    )
    parser.add_argument(
        "--inflight", type=int, default=DEFAULT_INFLIGHT, help="jobs in flight at once"
    )
    parser.add_argument("--journal-bytes", type=int, default=JOURNAL_BYTES)
    parser.add_argument("--audit-bytes", type=int, default=AUDIT_BYTES)
    parser.add_argument(
        "--phase", action="append", choices=sorted(PHASES), help="run only this phase"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.jobs <= RESENT or args.inflight < 1:
        parser.error(f"--jobs must be over {RESENT}, --inflight at least 1")
    args.phase = args.phase or list(PHASES)
    setup_logging(args.verbose)
    return run_and_report(lambda tmp: run(args, tmp), args.json, print_report)


if __name__ == "__main__":
    raise SystemExit(main())
