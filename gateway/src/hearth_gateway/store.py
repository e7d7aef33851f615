"""Gateway state in SQLite (WAL): the job journal with stored answers, the audit table, the blob
index (with each blob's data label), persistent tasks and paired devices.

Durability does not rest on the broker: a job is journaled when accepted, its answer is stored
before it is published, and a job id seen again is answered from here instead of running twice.
Each row keeps a digest of its job's content: the same id sent with other content is a conflict
(refused), never answered with the first job's result.
Accepted jobs that were never answered (the gateway died) are run again on start: jobs have no
side effects outside their sandbox, so a re-run is safe, and the device gets its answer.

The journal and the audit table are bounded by time and by bytes (policy ``limits``):

- A job's request (its stdin included) is kept until the job is answered, never longer, and is
  never dropped before: that is what lets an accepted job survive a SIGKILL. Admission bounds
  how many wait (``max_queue`` of at most ``max_message_bytes`` each). A request larger than
  ``journal_inline_bytes`` is journaled by reference: sealed, in a file of its own (_spool.py).
- An answer of up to ``journal_inline_bytes`` is kept for ``answer_retention_s``; past
  ``journal_bytes`` (kept answers and waiting requests together) the oldest answers go first.
- A larger answer is not journaled at all: the job's entry goes when its answer is published,
  and the job id sent again runs the job again (``finish`` says why that is safe).
- Audit rows are kept for ``audit_retention_s``; past ``audit_bytes`` the oldest go first.

One write per job, where the job is quick (``accept_later``, ``finish(batch=True)``, ``flush``):
a job's accept row is held in memory for a few milliseconds; when the job is answered first, its
row is written once, already answered, and its request is never sealed or written at all. A row
still held past its delay is written as accepted. Held rows and answers are written together,
one transaction per ``flush`` (the daemon flushes once per turn of its loop: a group commit).
Durability for QoS 1 holds because the broker's PUBACK for a job waits until the row covering it
is committed (``Receipt.durable``; link.py): a gateway that dies first has acknowledged nothing,
and the broker delivers the request again when it reconnects.

A row's size is estimated as it is written (its values, whole overflow pages for large ones, its
index entries) and the totals are kept in memory, so checking a bound costs nothing per job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import sqlite_utils

from hearth.protocol import DataClass
from hearth_gateway._spool import Spool
from hearth_gateway.crypto import Sealer, SealError
from hearth_gateway.policy import LimitsPolicy

__all__ = [
    "CONFLICT",
    "AuditEntry",
    "DeviceRecord",
    "JournalEntry",
    "JournalStats",
    "Receipt",
    "Store",
]

log = logging.getLogger(__name__)

# Quota accounting's reads, shared with ``hearth-gateway usage`` (quota.py), which opens the
# file read-only while the daemon runs.
USAGE_SQL = "SELECT client_id, app, cpu_s, jobs FROM usage WHERE day=? ORDER BY 1, 2"
STORED_SQL = (
    "SELECT o.client_id, o.app, sum(o.size) FROM blob_owners o"
    " JOIN blobs b ON b.sha256 = o.sha256 GROUP BY 1, 2"
)
TASK_APPS_SQL = (
    "SELECT a.task_id, a.client_id, a.app FROM task_apps a JOIN tasks t ON t.task_id = a.task_id"
)

# Estimated bytes a row takes on disk beyond its values: record header, rowid, cell pointer and
# the unused part of its page; for a job, also its entries in the three indexes (job id, state,
# answered time), filled about two-thirds by random inserts. Measured with SQLite's dbstat
# (tests/test_store.py holds the estimate at or above what the tables take).
_JOB_OVERHEAD = 160
_AUDIT_OVERHEAD = 40
_WAL_LIMIT = 8 * 1024 * 1024  # the WAL is truncated back to this after a checkpoint
_CHECKPOINT_S = 0.1  # how often the checkpointer writes the WAL back into the database
_CHECKPOINT_BYTES = 2 * 1024 * 1024  # ... or sooner, once about this much has been written
# Past this much written since the last checkpoint, a commit waits for the next one rather than
# let the WAL grow on (answers of a megabyte each, faster than the thread writes them back).
_CHECKPOINT_BACKLOG = 4 * 1024 * 1024
# SQLite's own checkpoint in a commit, past this many pages in the WAL (its default, 4 MiB): a
# backstop that small jobs seldom reach (the thread keeps the WAL smaller), and that caps it when
# large answers arrive faster than the thread writes them back.
_AUTOCHECKPOINT_PAGES = 1000
_ROW_BYTES = 4096  # what a row costs the WAL beyond its payload, about: a page or so
_FREE_SLACK = 8 * 1024 * 1024  # free pages kept in the file for reuse; more go back (expire)
_EVICT_BATCH = 256  # rows read per query while making room
# Accept rows held in memory at most: past this many, a flush writes them all (each one holds a
# PUBACK, and the broker sends a client only so many unacknowledged messages: 20 by default).
_MAX_HELD = 8


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One certificate issued to a paired device."""

    serial: str  # hex
    device_id: str
    fingerprint: str
    key_fingerprint: str
    paired_at: float
    revoked_at: float | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    client_id: str
    job_id: str
    request: bytes
    response_topic: str
    correlation: bytes
    # sha256 of the job's content (dispatch.py): the same job id sent again with other content
    # is a conflict, not a re-send. Empty: not known (rows written before it was kept).
    digest: bytes = b""


class AuditEntry(NamedTuple):
    """One row of the audit table, less its time."""

    actor: str  # device or task that asked
    action: str
    target: str
    decision: str  # allowed | refused
    reason: str


@dataclass(frozen=True, slots=True)
class JournalStats:
    """The journal's and the audit table's size, for the status."""

    waiting: int  # jobs accepted and not yet answered (their requests are kept)
    answers: int  # answered jobs whose answer is kept
    journal_bytes: int  # both together, estimated on disk (large requests' files included)
    journal_bytes_limit: int  # limits.journal_bytes
    audit_rows: int
    audit_bytes: int  # estimated on disk
    audit_bytes_limit: int  # limits.audit_bytes
    file_bytes: int  # the database file and its WAL (every table, free pages included)
    evicted: int  # answers dropped early for the byte bound (since start)
    unkept: int  # answers too large to keep, not journaled (since start)


class Receipt:
    """A job accepted with ``accept_later``: ``durable`` once a committed row covers it (its
    accept row, or its answer), or once nothing about it is left to write."""

    __slots__ = ("audit", "due", "durable", "entry", "reply")

    def __init__(self, entry: JournalEntry, audit: AuditEntry | None, due: float) -> None:
        self.entry = entry
        self.audit = audit
        self.due = due  # time.monotonic(): written as accepted at the first flush after this
        self.reply: bytes | None = None  # answered before its row was written
        self.durable = False


# A job id seen before: its state and stored answer. State "conflict": the id is journaled
# for a job with other content (nothing is written, and the stored answer is not returned).
Known = tuple[str, bytes | None]
CONFLICT = "conflict"


def _conflicts(stored: bytes | None, sent: bytes) -> bool:
    """Whether a job id's stored digest and a re-sent job's differ; a row written before
    digests were kept (empty) matches anything, as before."""
    return bool(stored) and bool(sent) and stored != sent


@dataclass(slots=True)
class _Totals:
    """Running totals of the bounded tables. Copied when a transaction begins and put back if
    it rolls back, so they always describe what is committed."""

    waiting: int = 0
    answers: int = 0
    journal_bytes: int = 0
    audit_rows: int = 0
    audit_bytes: int = 0
    evicted: int = 0
    unkept: int = 0


class Store:
    """One SQLite connection behind a lock: writes are short and few per job. Statements that
    must stand or fall together run in ``transaction()``."""

    def __init__(self, path: Path, sealer: Sealer, limits: LimitsPolicy | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._limits = limits if limits is not None else LimitsPolicy()
        # Payloads, answers and task state are sealed before they reach SQLite; ids, states,
        # counters and times stay in the clear so the gateway can query them.
        self._sealer = sealer
        self._spool = Spool(path.parent / "requests")
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db = sqlite_utils.Database(self._conn)
        # Reentrant: a transaction holds it while the methods called inside take it again.
        self._lock = threading.RLock()
        self._depth = 0  # open transaction levels (savepoints past the first)
        self._closed = False
        self._totals = _Totals()
        # Accept rows not written yet, oldest first, and answers to write to rows that are.
        self._held: dict[tuple[str, str], Receipt] = {}
        self._answers: list[tuple[str, str, bytes]] = []
        self._usage: list[tuple[str, str, str, float, int]] = []  # quota.py's, for the same
        self._incremental_vacuum()
        # WAL + synchronous=NORMAL: commits survive a process crash (SIGKILL), and a power loss
        # can only drop the last transactions, never corrupt the file.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
        # Checkpoints (the WAL written back into the database, with two fsyncs) run on a thread
        # of their own (_Checkpointer), not inside a commit on the daemon's loop: one commit in
        # a couple of hundred used to take milliseconds, and the requests behind it waited.
        # Commits and checkpoints take turns (the gate): a checkpoint with no commit beside it
        # writes every frame back, so the next commit starts the WAL over and it stays bounded;
        # the daemon's commits do not wait for one (flush(wait=False)), they come a turn later.
        self._gate = threading.RLock()
        self._conn.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
        self._page = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
        self._migrate()
        self._count()
        self._checkpointer = _Checkpointer(path, self._gate)
        self._spool.sweep(
            {
                Spool.name(client_id, job_id)
                for client_id, job_id in self._conn.execute(
                    "SELECT client_id, job_id FROM jobs WHERE state='accepted' AND request_file=1"
                )
            }
        )

    def _incremental_vacuum(self) -> None:
        """Pages freed by expired answers and audit rows go back to the file system (see
        ``expire``), so the file follows the bounds down as well as up. A new database takes the
        mode at once; one made before needs a VACUUM, once."""
        if int(self._conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2:
            return
        self._conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if self._db.table_names():
            log.info("rewriting %s once so that it can shrink (auto_vacuum)", self._path.name)
            self._conn.execute("VACUUM")

    def _migrate(self) -> None:
        if "jobs" not in self._db.table_names():
            self._db.table("jobs").create(
                {
                    "client_id": str,
                    "job_id": str,
                    "state": str,  # accepted | done
                    "request": bytes,  # kept until answered, for a re-run after a crash
                    "response_topic": str,
                    "correlation": bytes,
                    "reply": bytes,
                    "accepted_at": float,
                    "finished_at": float,
                },
                pk=("client_id", "job_id"),
            )
            self._db.table("jobs").create_index(["state"])
        jobs = self._db.table("jobs").columns_dict
        if "bytes" not in jobs:
            # Added with the journal's byte bound, for new and older databases alike.
            self._db.table("jobs").add_column("bytes", int, not_null_default=0)
            self._conn.execute(
                "UPDATE jobs SET bytes = ? + length(client_id) * 2 + length(job_id) * 2"
                " + coalesce(length(request), 0) + coalesce(length(reply), 0)"
                " + coalesce(length(response_topic), 0) + coalesce(length(correlation), 0)",
                (_JOB_OVERHEAD,),
            )
        if "request_file" not in jobs:
            # 1: the request is in a file of its own (_spool.py), not in the row.
            self._db.table("jobs").add_column("request_file", int, not_null_default=0)
        if "digest" not in jobs:
            # The job's content digest (JournalEntry.digest), for new and older databases
            # alike; NULL in rows written before it, which then match any re-send.
            self._db.table("jobs").add_column("digest", bytes)
        # The oldest answers go first, by time or for room; waiting jobs are not in it. Queries
        # name it (INDEXED BY): without statistics the planner would take the index on state
        # and sort every answer to find the oldest.
        self._conn.execute(
            "CREATE INDEX IF NOT EXISTS jobs_answered ON jobs (finished_at, bytes)"
            " WHERE state='done'"
        )
        if "tasks" not in self._db.table_names():
            self._db.table("tasks").create(
                {
                    "task_id": str,
                    "owner": str,
                    "spec": bytes,  # the TaskInstall request, msgpack
                    "info": bytes,  # TaskInfo (state, counters), msgpack
                    "checkpoint": bytes,  # compressed memory + globals; empty until the first event
                    "kv": bytes,  # msgpack map
                },
                pk="task_id",
            )
        if "task_inbox" not in self._db.table_names():
            # Events received for a task and not yet covered by a checkpoint. Written before
            # the broker gets its PUBACK, deleted in the transaction that stores the checkpoint.
            self._db.table("task_inbox").create(
                {"id": int, "task_id": str, "topic": str, "payload": bytes, "received_at": float},
                pk="id",
            )
            self._db.table("task_inbox").create_index(["task_id", "id"])
        if "owners" not in self._db.table_names():
            self._db.table("owners").create({"client_id": str, "last_seen": float}, pk="client_id")
        if "audit" not in self._db.table_names():
            self._db.table("audit").create(
                {
                    "id": int,
                    "at": float,
                    "actor": str,  # device or task that asked
                    "action": str,
                    "target": str,
                    "decision": str,  # allowed | refused
                    "reason": str,
                },
                pk="id",
            )
        if "bytes" not in self._db.table("audit").columns_dict:
            self._db.table("audit").add_column("bytes", int, not_null_default=0)
            self._conn.execute(
                "UPDATE audit SET bytes = ? + length(CAST(actor AS BLOB))"
                " + length(CAST(action AS BLOB)) + length(CAST(target AS BLOB))"
                " + length(CAST(decision AS BLOB)) + length(CAST(reason AS BLOB))",
                (_AUDIT_OVERHEAD,),
            )
        if "blobs" not in self._db.table_names():
            self._db.table("blobs").create(
                {"sha256": str, "size": int, "stored_at": float, "last_used": float},
                pk="sha256",
            )
        if "data_class" not in self._db.table("blobs").columns_dict:
            # Added with blob labels, for new and older databases alike: blobs stored before
            # uploads carried a label count as private, so none of them is ever forwarded.
            self._db.table("blobs").add_column("data_class", str, not_null_default="private")
        if "devices" not in self._db.table_names():
            # Paired devices, one row per certificate issued (pairing.py). A device id is
            # locked out once it has rows and none of them is unrevoked.
            self._db.table("devices").create(
                {
                    "serial": str,  # the certificate's serial, hex
                    "device_id": str,  # its CN
                    "fingerprint": str,  # sha256 of the certificate's DER, hex
                    "key_fingerprint": str,  # sha256 of its public key (SPKI): re-pairing
                    "paired_at": float,
                    "revoked_at": float,  # NULL while valid
                    "reason": str,
                },
                pk="serial",
            )
            self._db.table("devices").create_index(["device_id"])
        self._migrate_usage()

    def _migrate_usage(self) -> None:
        """Quota accounting (quota.py): run time per UTC day, device and application; who
        uploaded which stored blob; which application installed each task."""
        if "usage" not in self._db.table_names():
            self._db.table("usage").create(
                {"day": str, "client_id": str, "app": str, "cpu_s": float, "jobs": int},
                pk=("day", "client_id", "app"),
            )
        if "blob_owners" not in self._db.table_names():
            self._db.table("blob_owners").create(
                {"sha256": str, "client_id": str, "app": str, "size": int},
                pk=("sha256", "client_id", "app"),
            )
        if "task_apps" not in self._db.table_names():
            self._db.table("task_apps").create(
                {"task_id": str, "client_id": str, "app": str}, pk="task_id"
            )

    def _count(self) -> None:
        """The running totals, read once at start."""
        totals = self._totals
        for state, rows, size in self._conn.execute(
            "SELECT state, count(*), coalesce(sum(bytes), 0) FROM jobs GROUP BY state"
        ):
            if state == "accepted":
                totals.waiting = int(rows)
            else:
                totals.answers += int(rows)
            totals.journal_bytes += int(size)
        rows, size = self._conn.execute(
            "SELECT count(*), coalesce(sum(bytes), 0) FROM audit"
        ).fetchone()
        totals.audit_rows, totals.audit_bytes = int(rows), int(size)

    # -- transactions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """What the store does inside commits together or not at all: any exception rolls it
        back and goes on up. A failed statement thus never leaves the connection inside a
        transaction (where every later BEGIN would fail until a restart). Holds the store's
        lock throughout; a nested one is a savepoint of the outer one.

        >>> with store.transaction():  # doctest: +SKIP
        ...     store.put_task(...)
        ...     store.drop_inbox(...)
        """
        with self._lock, self._gate:
            depth = self._depth
            saved = dataclasses.replace(self._totals)
            self._conn.execute(f"SAVEPOINT level{depth}" if depth else "BEGIN")
            self._depth = depth + 1
            try:
                yield
                self._conn.execute(f"RELEASE level{depth}" if depth else "COMMIT")
            except BaseException:
                self._rollback(depth)
                self._totals = saved
                raise
            finally:
                self._depth = depth

    def _rollback(self, depth: int) -> None:
        if not self._conn.in_transaction:
            return  # SQLite rolled back already (it does on some I/O errors)
        try:
            if depth:
                self._conn.execute(f"ROLLBACK TO level{depth}")
                self._conn.execute(f"RELEASE level{depth}")
            else:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            # Keep the error that caused the rollback: it is the one worth reading.
            log.exception("rolling back a failed transaction failed too")

    # -- journal ---------------------------------------------------------------------------

    def accept(
        self, entry: JournalEntry, audit: AuditEntry | None = None
    ) -> tuple[str, bytes | None] | None:
        """Journal a new job (and its audit entry, in the same transaction: one commit per job
        instead of two). Returns None if it is new, else (state, stored reply or None) of the
        job already known under that id, or (CONFLICT, None) when that job's content differs;
        then nothing is written."""
        spooled = len(entry.request) > self._limits.journal_inline_bytes
        name = Spool.name(entry.client_id, entry.job_id)
        try:
            with self.transaction():
                row = self._conn.execute(
                    "SELECT state, reply, digest FROM jobs WHERE client_id=? AND job_id=?",
                    (entry.client_id, entry.job_id),
                ).fetchone()
                if row is not None:
                    spooled = False  # nothing was written
                    return self._known(entry, row)
                self._insert_job(entry, name if spooled else None, audit)
                return None
        except BaseException:
            if spooled:
                self._spool.remove([name])
            raise

    def accept_later(
        self, entry: JournalEntry, audit: AuditEntry | None, delay_s: float
    ) -> Known | Receipt:
        """``accept``, with the row held in memory for ``delay_s``: a job answered meanwhile
        gets one row, its answer (see the module's docstring). Returns the known job's
        (state, answer) as ``accept`` does, or the new job's Receipt."""
        key = (entry.client_id, entry.job_id)
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                if _conflicts(held.entry.digest, entry.digest):
                    return CONFLICT, None
                # Answered (published) and not written yet: the answer; else still running,
                # its one answer on its way.
                return ("done", held.reply) if held.reply is not None else ("accepted", None)
            row = self._conn.execute(
                "SELECT state, reply, digest FROM jobs WHERE client_id=? AND job_id=?", key
            ).fetchone()
            if row is not None:
                known = self._known(entry, row)
                if known[0] == "accepted":  # its answer may be waiting for the next flush
                    reply = next((r for c, j, r in self._answers if (c, j) == key), None)
                    if reply is not None:
                        return "done", reply
                return known
            receipt = Receipt(entry, audit, time.monotonic() + delay_s)
            self._held[key] = receipt
            return receipt

    def _known(self, entry: JournalEntry, row: tuple[str, bytes | None, bytes | None]) -> Known:
        """A journaled job id sent again: its (state, stored answer), or a conflict."""
        if _conflicts(row[2], entry.digest):
            return CONFLICT, None
        where = _where("jobs.reply", entry.client_id, entry.job_id)
        return str(row[0]), self._sealer.open(row[1], where) or None

    def next_due(self) -> float | None:
        """When the oldest held accept row is due (time.monotonic()), or None."""
        with self._lock:
            first = next(iter(self._held.values()), None)
            return None if first is None else first.due

    def flush(self, *, everything: bool = False, wait: bool = True) -> bool:
        """Write, in one transaction, the held rows that are due (all of them with
        ``everything``, or past ``_MAX_HELD``), every batched answer and the batched usage. What
        a failed commit did not write is kept for the next flush. Without ``wait``, a flush
        while a checkpoint runs writes nothing and returns False (call again soon)."""
        with self._lock:
            if not self._held and not self._answers and not self._usage:
                return True
            now = time.monotonic()
            everything = everything or len(self._held) > _MAX_HELD
            due = [
                r for r in self._held.values() if r.reply is not None or everything or r.due <= now
            ]
            if not due and not self._answers and not self._usage:
                return True
            if not self._gate.acquire(blocking=wait or self._checkpointer.behind):
                return False
            try:
                self._flush(due)
            finally:
                self._gate.release()
            return True

    def _flush(self, due: list[Receipt]) -> None:
        with self._lock:
            answers, self._answers = self._answers, []
            usage, self._usage = self._usage, []
            spooled: list[str] = []
            try:
                with self.transaction():
                    for receipt in due:
                        self._write_held(receipt)
                    for client_id, job_id, reply in answers:
                        if self._finish_row(client_id, job_id, reply):
                            spooled.append(Spool.name(client_id, job_id))
                    if usage:
                        self._write_usage(usage)
            except BaseException:
                self._answers = answers + self._answers
                self._usage = usage + self._usage
                raise
            written = 0
            for receipt in due:
                entry = receipt.entry
                del self._held[entry.client_id, entry.job_id]
                receipt.durable = True
                written += len(receipt.reply if receipt.reply is not None else entry.request)
            written += sum(len(reply) for _c, _j, reply in answers)
            self._checkpointer.wrote(written + _ROW_BYTES * (len(due) + len(answers)))
        if spooled:  # once committed: a crash before this leaves files the next start sweeps
            self._spool.remove(spooled)

    def abandon_pending(self) -> list[tuple[str, str, bytes]]:
        """The disk is full and ``flush`` failed: give up the held rows (their requests are
        acknowledged all the same: each device has its answer or will re-send) and return the
        batched answers that were not stored, (client, job id, answer) each."""
        with self._lock:
            answers, self._answers = self._answers, []
            for receipt in self._held.values():
                receipt.durable = True
            self._held.clear()
        return answers

    def _write_held(self, receipt: Receipt) -> None:
        entry = receipt.entry
        if receipt.reply is None:  # still running: its accept row, as ``accept`` writes it
            big = len(entry.request) > self._limits.journal_inline_bytes
            file = Spool.name(entry.client_id, entry.job_id) if big else None
            self._insert_job(entry, file, receipt.audit)
            return
        # Answered already: one row, done (its request never written).
        now = time.time()
        sealed = self._sealer.seal(
            receipt.reply, _where("jobs.reply", entry.client_id, entry.job_id)
        )
        size = _job_bytes(self._page, entry.client_id, entry.job_id, sealed, entry.digest)
        self._conn.execute(
            "INSERT INTO jobs (client_id, job_id, state, request, request_file, response_topic,"
            " correlation, accepted_at, reply, finished_at, bytes, digest)"
            " VALUES (?, ?, 'done', NULL, 0, '', x'', ?, ?, ?, ?, ?)",
            (entry.client_id, entry.job_id, now, sealed, now, size, entry.digest or None),
        )
        self._totals.answers += 1
        self._totals.journal_bytes += size
        if receipt.audit is not None:
            self._insert_audit(now, receipt.audit)
        self._bound_journal()

    def _insert_job(self, entry: JournalEntry, file: str | None, audit: AuditEntry | None) -> None:
        request = self._sealer.seal(
            entry.request, _where("jobs.request", entry.client_id, entry.job_id)
        )
        topic = entry.response_topic.encode()
        if file is not None:
            on_disk = self._spool.write(file, request)
            size = on_disk + _job_bytes(
                self._page, entry.client_id, entry.job_id, topic, entry.correlation, entry.digest
            )
        else:
            size = _job_bytes(
                self._page,
                entry.client_id,
                entry.job_id,
                request,
                topic,
                entry.correlation,
                entry.digest,
            )
        now = time.time()
        self._conn.execute(
            "INSERT INTO jobs (client_id, job_id, state, request, request_file, response_topic,"
            " correlation, accepted_at, bytes, digest)"
            " VALUES (?, ?, 'accepted', ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.client_id,
                entry.job_id,
                None if file is not None else request,
                int(file is not None),
                entry.response_topic,
                entry.correlation,
                now,
                size,
                entry.digest or None,
            ),
        )
        self._totals.waiting += 1
        self._totals.journal_bytes += size
        if audit is not None:
            self._insert_audit(now, audit)
        self._bound_journal()

    def finish(self, client_id: str, job_id: str, reply: bytes, *, batch: bool = False) -> None:
        """Store a job's answer and drop its request; with ``batch``, at the next ``flush``
        (a job whose row is still held then gets one row, answered).

        An answer larger than ``journal_inline_bytes`` is not kept: the job's entry goes, so
        the same job id sent again runs the job again rather than getting this answer. That
        keeps a few large answers from filling the disk or pushing the many small ones out,
        and it is safe: a job has no effect outside its sandbox (no network, a scratch
        directory that goes with it, nothing kept between jobs), so a second run costs CPU
        and nothing else, and each request still gets one answer. (A hash of the answer would
        not tell a re-run's answer from a different one: answers carry their timing.)"""
        keep = len(reply) <= self._limits.journal_inline_bytes
        with self._lock:
            receipt = self._held.get((client_id, job_id))
            if receipt is not None:
                if keep:
                    receipt.reply = reply
                    if batch:
                        return
                    self.flush()
                    return
                # Nothing to write: neither its request nor its answer is kept.
                del self._held[client_id, job_id]
                receipt.durable = True
                self._totals.unkept += 1
                return
            if batch:
                self._answers.append((client_id, job_id, reply))
                return
            with self.transaction():
                spooled = self._finish_row(client_id, job_id, reply)
        if spooled:  # once committed: a crash before this leaves a file the next start sweeps
            self._spool.remove([Spool.name(client_id, job_id)])

    def _finish_row(self, client_id: str, job_id: str, reply: bytes) -> bool:
        """The answer to a written accept row (inside a transaction); returns whether its
        request was in a file of its own (to remove once committed)."""
        keep = len(reply) <= self._limits.journal_inline_bytes
        row = self._conn.execute(
            "SELECT rowid, bytes, request_file, digest FROM jobs"
            " WHERE client_id=? AND job_id=? AND state='accepted'",
            (client_id, job_id),
        ).fetchone()
        if row is None:
            return False  # forgotten meanwhile: nothing to answer for
        totals = self._totals
        totals.waiting -= 1
        totals.journal_bytes -= int(row[1])
        if not keep:
            self._conn.execute("DELETE FROM jobs WHERE rowid=?", (row[0],))
            totals.unkept += 1
        else:
            sealed = self._sealer.seal(reply, _where("jobs.reply", client_id, job_id))
            size = _job_bytes(self._page, client_id, job_id, sealed, row[3] or b"")
            # The reply goes to the request's own topic; a re-send brings its own.
            self._conn.execute(
                "UPDATE jobs SET state='done', request=NULL, request_file=0,"
                " response_topic='', correlation=x'', reply=?, finished_at=?, bytes=?"
                " WHERE rowid=?",
                (sealed, time.time(), size, row[0]),
            )
            totals.answers += 1
            totals.journal_bytes += size
            self._bound_journal()
        return bool(row[2])

    def forget(self, client_id: str, job_id: str) -> None:
        """Drop a journal entry whose job was refused or failed through no fault of its own,
        so that the same job id sent again runs."""
        with self._lock:
            receipt = self._held.pop((client_id, job_id), None)
        if receipt is not None:
            receipt.durable = True  # nothing of it to write
            return
        with self.transaction():
            rows = self._conn.execute(
                "DELETE FROM jobs WHERE client_id=? AND job_id=? AND state='accepted'"
                " RETURNING bytes, request_file",
                (client_id, job_id),
            ).fetchall()
            for size, _ in rows:
                self._totals.waiting -= 1
                self._totals.journal_bytes -= int(size)
        if any(file for _, file in rows):
            self._spool.remove([Spool.name(client_id, job_id)])

    def unfinished(self) -> list[JournalEntry]:
        """The jobs accepted and not answered, oldest first. One whose request file did not
        survive (a power cut: files, like commits, are not synced) is dropped and logged."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT client_id, job_id, request, request_file, response_topic, correlation"
                " FROM jobs WHERE state='accepted' ORDER BY accepted_at"
            ).fetchall()
        entries: list[JournalEntry] = []
        for client_id, job_id, request, in_file, topic, correlation in rows:
            try:
                sealed = self._spool.read(Spool.name(client_id, job_id)) if in_file else request
                data = self._sealer.open(sealed, _where("jobs.request", client_id, job_id))
            except (OSError, SealError) as exc:
                log.warning("job %s of %s: its request is lost (%s)", job_id, client_id, exc)
                self.forget(client_id, job_id)
                continue
            entries.append(JournalEntry(client_id, job_id, data, topic, correlation))
        return entries

    def _bound_journal(self) -> None:
        """Past ``journal_bytes``, drop the oldest answers until the journal is a sixteenth
        under it (so this runs once per batch of jobs, not for each). Waiting jobs are never
        dropped: admission bounds them."""
        bound = self._limits.journal_bytes
        if self._totals.journal_bytes <= bound:
            return
        dropped = self._drop_oldest(
            "SELECT rowid, bytes FROM jobs INDEXED BY jobs_answered WHERE state='done'"
            " ORDER BY finished_at LIMIT ?",
            "DELETE FROM jobs WHERE rowid=?",
            self._totals.journal_bytes - (bound - bound // 16),
        )
        self._totals.answers -= dropped[0]
        self._totals.journal_bytes -= dropped[1]
        self._totals.evicted += dropped[0]

    def _drop_oldest(self, select: str, delete: str, excess: int) -> tuple[int, int]:
        """Delete the rows ``select`` lists (oldest first) until ``excess`` bytes are gone, or
        none is left; returns (rows, bytes) deleted."""
        rows = size = 0
        while size < excess:
            batch = self._conn.execute(select, (_EVICT_BATCH,)).fetchall()
            chosen: list[tuple[int]] = []
            for rowid, row_bytes in batch:
                if size >= excess:
                    break
                chosen.append((int(rowid),))
                size += int(row_bytes)
            self._conn.executemany(delete, chosen)
            rows += len(chosen)
            if len(batch) < _EVICT_BATCH:
                break
        return rows, size

    def expire(self) -> tuple[int, int]:
        """Drop the answers older than ``answer_retention_s`` and the audit rows older than
        ``audit_retention_s``, then give the free pages past a few MiB back to the file system.
        Returns (answers, audit rows) dropped. Called from the daemon's housekeeping."""
        now = time.time()
        with self.transaction():
            answers = self._conn.execute(
                "DELETE FROM jobs INDEXED BY jobs_answered WHERE state='done' AND finished_at < ?"
                " RETURNING bytes",
                (now - self._limits.answer_retention_s,),
            ).fetchall()
            self._totals.answers -= len(answers)
            self._totals.journal_bytes -= sum(int(r[0]) for r in answers)
            # Rows go in time order: the first one young enough marks where to cut, found
            # without an index on the time (nothing but the expired rows is read).
            first = self._conn.execute(
                "SELECT id FROM audit WHERE at >= ? ORDER BY id LIMIT 1",
                (now - self._limits.audit_retention_s,),
            ).fetchone()
            cut = int(first[0]) if first is not None else 1 << 62  # none young enough: all
            rows, size = self._conn.execute(
                "SELECT count(*), coalesce(sum(bytes), 0) FROM audit WHERE id < ?", (cut,)
            ).fetchone()
            self._conn.execute("DELETE FROM audit WHERE id < ?", (cut,))
            self._totals.audit_rows -= int(rows)
            self._totals.audit_bytes -= int(size)
        self._shrink()
        return len(answers), int(rows)

    def _shrink(self) -> None:
        with self._lock, self._gate:
            free = int(self._conn.execute("PRAGMA freelist_count").fetchone()[0])
            if free * self._page <= _FREE_SLACK:
                return
            # Each step of this pragma frees one page, and execute() takes one step only;
            # executescript() runs it to its end.
            self._conn.executescript(
                f"PRAGMA incremental_vacuum({free - _FREE_SLACK // self._page});"
            )
            # The file is cut to its new length when the WAL is written back, so do that now.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def stats(self) -> JournalStats:
        """The bounded tables' sizes (from the running totals: no query) and the file's."""
        with self._lock:
            t = dataclasses.replace(self._totals)
        on_disk = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                on_disk += os.stat(f"{self._path}{suffix}").st_size
        return JournalStats(
            waiting=t.waiting,
            answers=t.answers,
            journal_bytes=t.journal_bytes,
            journal_bytes_limit=self._limits.journal_bytes,
            audit_rows=t.audit_rows,
            audit_bytes=t.audit_bytes,
            audit_bytes_limit=self._limits.audit_bytes,
            file_bytes=on_disk,
            evicted=t.evicted,
            unkept=t.unkept,
        )

    # -- audit -----------------------------------------------------------------------------

    def audit(self, actor: str, action: str, target: str, decision: str, reason: str) -> None:
        """One audit row, committed now (``accept`` can carry a job's own)."""
        with self.transaction():
            self._insert_audit(time.time(), AuditEntry(actor, action, target, decision, reason))

    def _insert_audit(self, now: float, entry: AuditEntry) -> None:
        size = _AUDIT_OVERHEAD + sum(len(value.encode()) for value in entry)
        self._conn.execute(
            "INSERT INTO audit (at, actor, action, target, decision, reason, bytes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now, *entry, size),
        )
        totals = self._totals
        totals.audit_rows += 1
        totals.audit_bytes += size
        bound = self._limits.audit_bytes
        if totals.audit_bytes > bound:
            rows, freed = self._drop_oldest(
                "SELECT id, bytes FROM audit ORDER BY id LIMIT ?",
                "DELETE FROM audit WHERE id=?",
                totals.audit_bytes - (bound - bound // 16),
            )
            totals.audit_rows -= rows
            totals.audit_bytes -= freed

    # -- blob index ------------------------------------------------------------------------

    def add_blob(self, sha256: str, size: int, data_class: DataClass = "private") -> None:
        """Record a stored blob. A blob already recorded keeps its label: the first complete
        upload decides, so a public upload never turns a private blob public."""
        now = time.time()
        with self._lock:
            self._conn.execute(
                "INSERT INTO blobs (sha256, size, stored_at, last_used, data_class)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO UPDATE SET"
                " size=excluded.size, stored_at=excluded.stored_at, last_used=excluded.last_used",
                (sha256, size, now, now, data_class),
            )

    def public_blobs(self) -> set[str]:
        """The blobs labelled public (every other stored blob is private)."""
        with self._lock:
            rows = self._conn.execute("SELECT sha256 FROM blobs WHERE data_class='public'")
            return {str(r[0]) for r in rows}

    def remove_blob(self, sha256: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM blobs WHERE sha256=?", (sha256,))

    def blob_totals(self) -> tuple[int, int]:
        """(count, bytes) of stored blobs."""
        with self._lock:
            count, size = self._conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM blobs"
            ).fetchone()
        return int(count), int(size)

    # -- quota accounting (quota.py) ---------------------------------------------------------

    def add_usage(self, rows: list[tuple[str, str, str, float, int]]) -> None:
        """Run time and jobs (day, client_id, app, cpu_s, jobs), added to their days' rows by
        the next ``flush``'s transaction (quota.py hands over a loop turn's rows: one commit
        per turn, not two)."""
        with self._lock:
            self._usage.extend(rows)

    def _write_usage(self, rows: list[tuple[str, str, str, float, int]]) -> None:
        self._conn.executemany(
            "INSERT INTO usage (day, client_id, app, cpu_s, jobs) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (day, client_id, app) DO UPDATE SET"
            " cpu_s = cpu_s + excluded.cpu_s, jobs = jobs + excluded.jobs",
            rows,
        )

    def usage(self, day: str) -> list[tuple[str, str, float, int]]:
        """(client_id, app, cpu_s, jobs) of one UTC day ("2026-12-04")."""
        with self._lock:
            rows = self._conn.execute(USAGE_SQL, (day,)).fetchall()
        return [(str(c), str(a), float(s), int(j)) for c, a, s, j in rows]

    def add_blob_owner(self, sha256: str, client_id: str, app: str, size: int) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO blob_owners (sha256, client_id, app, size)"
                " VALUES (?, ?, ?, ?)",
                (sha256, client_id, app, size),
            )

    def stored_bytes(self) -> list[tuple[str, str, int]]:
        """(client_id, app, bytes) of the blobs each uploaded that are still stored."""
        with self._lock:
            rows = self._conn.execute(STORED_SQL).fetchall()
        return [(str(c), str(a), int(n)) for c, a, n in rows]

    def set_task_app(self, task_id: str, client_id: str, app: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO task_apps (task_id, client_id, app) VALUES (?, ?, ?)",
                (task_id, client_id, app),
            )

    def task_apps(self) -> dict[str, tuple[str, str]]:
        """task id -> (client_id, app) of the tasks still stored."""
        with self._lock:
            rows = self._conn.execute(TASK_APPS_SQL).fetchall()
        return {str(t): (str(c), str(a)) for t, c, a in rows}

    # -- persistent tasks ------------------------------------------------------------------

    def tasks(self) -> list[tuple[str, str, bytes, bytes, bytes, bytes]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT task_id, owner, spec, info, checkpoint, kv FROM tasks"
            ).fetchall()
        seal = self._sealer
        return [
            (
                r[0],
                r[1],
                seal.open(r[2], _where("tasks.spec", r[0])),
                r[3],
                seal.open(r[4], _where("tasks.checkpoint", r[0])),
                seal.open(r[5], _where("tasks.kv", r[0])),
            )
            for r in rows
        ]

    def put_task(
        self,
        task_id: str,
        owner: str,
        *,
        spec: bytes,
        info: bytes,
        checkpoint: bytes,
        kv: bytes,
        done_inbox: list[int] | tuple[int, ...] = (),
    ) -> None:
        """Store a task's state and drop the inbox events it covers, in one transaction."""
        with self.transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO tasks (task_id, owner, spec, info, checkpoint, kv)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    task_id,
                    owner,
                    self._sealer.seal(spec, _where("tasks.spec", task_id)),
                    info,
                    self._sealer.seal(checkpoint, _where("tasks.checkpoint", task_id)),
                    self._sealer.seal(kv, _where("tasks.kv", task_id)),
                ),
            )
            if done_inbox:
                self._conn.executemany(
                    "DELETE FROM task_inbox WHERE id=?", [(i,) for i in done_inbox]
                )

    def delete_task(self, task_id: str) -> None:
        with self.transaction():
            self._conn.execute("DELETE FROM tasks WHERE task_id=?", (task_id,))
            self._conn.execute("DELETE FROM task_inbox WHERE task_id=?", (task_id,))

    def add_inbox_many(self, rows: list[tuple[str, str, bytes]]) -> list[int]:
        """Several tasks' copies of one message, in one transaction (one commit)."""
        ids: list[int] = []
        now = time.time()
        with self.transaction():
            for task_id, topic, payload in rows:
                cursor = self._conn.execute(
                    "INSERT INTO task_inbox (task_id, topic, payload, received_at)"
                    " VALUES (?, ?, ?, ?)",
                    (
                        task_id,
                        topic,
                        self._sealer.seal(payload, _where("task_inbox", task_id)),
                        now,
                    ),
                )
                ids.append(int(cursor.lastrowid or 0))
        return ids

    def drop_inbox(self, ids: list[int]) -> None:
        with self.transaction():
            self._conn.executemany("DELETE FROM task_inbox WHERE id=?", [(i,) for i in ids])

    def inbox(self) -> list[tuple[int, str, str, bytes]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, task_id, topic, payload FROM task_inbox ORDER BY id"
            ).fetchall()
        return [
            (int(r[0]), r[1], r[2], self._sealer.open(r[3], _where("task_inbox", r[1])))
            for r in rows
        ]

    def owners(self) -> dict[str, float]:
        with self._lock:
            rows = self._conn.execute("SELECT client_id, last_seen FROM owners").fetchall()
        return {str(r[0]): float(r[1]) for r in rows}

    def put_owners(self, seen: dict[str, float]) -> None:
        with self.transaction():
            self._conn.executemany(
                "INSERT OR REPLACE INTO owners (client_id, last_seen) VALUES (?, ?)",
                list(seen.items()),
            )

    # -- paired devices --------------------------------------------------------------------

    def add_device(self, device: DeviceRecord, supersede: bool = False) -> None:
        """Record a new certificate; ``supersede``: revoke the device's earlier ones (a device
        that paired again with the same key)."""
        with self.transaction():
            if supersede:
                self._conn.execute(
                    "UPDATE devices SET revoked_at=?, reason='superseded'"
                    " WHERE device_id=? AND revoked_at IS NULL",
                    (device.paired_at, device.device_id),
                )
            self._conn.execute(
                "INSERT INTO devices (serial, device_id, fingerprint, key_fingerprint,"
                " paired_at, revoked_at, reason) VALUES (?, ?, ?, ?, ?, NULL, '')",
                (
                    device.serial,
                    device.device_id,
                    device.fingerprint,
                    device.key_fingerprint,
                    device.paired_at,
                ),
            )

    def revoke_device(self, device_id: str, reason: str) -> list[str]:
        """Revoke every valid certificate of ``device_id``; returns their serials."""
        with self.transaction():
            rows = self._conn.execute(
                "SELECT serial FROM devices WHERE device_id=? AND revoked_at IS NULL",
                (device_id,),
            ).fetchall()
            self._conn.execute(
                "UPDATE devices SET revoked_at=?, reason=?"
                " WHERE device_id=? AND revoked_at IS NULL",
                (time.time(), reason, device_id),
            )
        return [str(r[0]) for r in rows]

    def devices(self) -> list[DeviceRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT serial, device_id, fingerprint, key_fingerprint, paired_at, revoked_at,"
                " reason FROM devices ORDER BY paired_at"
            ).fetchall()
        return [
            DeviceRecord(
                str(r[0]),
                str(r[1]),
                str(r[2]),
                str(r[3]),
                float(r[4]),
                None if r[5] is None else float(r[5]),
                str(r[6] or ""),
            )
            for r in rows
        ]

    def close(self) -> None:
        """Write what is held (accept rows, batched answers), then close. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self.flush(everything=True)
            except sqlite3.Error:
                log.exception("could not write the held journal rows")
            self._closed = True
            self._checkpointer.close()
            self._conn.close()


class _Checkpointer:
    """Writes the WAL back into the database every _CHECKPOINT_S (sooner after
    _CHECKPOINT_BYTES), on its own thread and connection (sqlite3 releases the GIL while SQLite
    works), with the store's commits held off meanwhile (the gate): so it ends with every frame
    written back, and the next commit starts the WAL over."""

    def __init__(self, path: Path, gate: threading.RLock) -> None:
        self._path = path
        self._gate = gate  # the store's: its commits and these checkpoints take turns
        self._stop = threading.Event()
        self._due = threading.Event()  # set: checkpoint now, without waiting for the period
        self._backlog = 0  # bytes committed since the last checkpoint (under the gate)
        self._thread = threading.Thread(target=self._run, name="journal-checkpoint", daemon=True)
        self._thread.start()

    @property
    def behind(self) -> bool:
        """Whether the WAL holds _CHECKPOINT_BACKLOG not written back yet."""
        return self._backlog >= _CHECKPOINT_BACKLOG

    def wrote(self, size: int) -> None:
        """``size`` bytes were committed: past _CHECKPOINT_BYTES, a checkpoint now."""
        self._backlog += size
        if self._backlog >= _CHECKPOINT_BYTES:
            self._due.set()  # the checkpoint starts the backlog over

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None)
        except sqlite3.Error:
            log.exception("journal checkpoints: cannot open %s", self._path.name)
            return
        try:
            conn.execute("PRAGMA wal_autocheckpoint=0")
            while not self._stop.is_set():
                self._due.wait(_CHECKPOINT_S)
                self._due.clear()
                try:
                    with self._gate:
                        self._backlog = 0
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # a full disk, say: the next one tries again
                    log.debug("journal checkpoint failed: %s", exc)
            with contextlib.suppress(sqlite3.Error), self._gate:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._due.set()
        self._thread.join()


def _where(column: str, *key: str) -> bytes:
    """Associated data for a sealed value: which column of which row it belongs to."""
    return "/".join((column, *key)).encode()


def _job_bytes(page: int, client_id: str, job_id: str, *values: bytes) -> int:
    """A journal row's estimated size on disk: its ids (twice: the table and the index of job
    ids), its other values, and whole overflow pages once they no longer fit in a b-tree page."""
    payload = sum(len(v) for v in values)
    if payload > page // 4:
        usable = page - 4  # an overflow page links to the next with 4 bytes
        payload = -(-payload // usable) * page
    return _JOB_OVERHEAD + 2 * (len(client_id) + len(job_id)) + payload
